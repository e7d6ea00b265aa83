"""The CUDA path: graph capture and its eager fallbacks (CPU), and the GPU checks (marked cuda)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import study.models.cuda_graph as cuda_graph
from study.config import TrialConfig
from study.models import DetachLSTM, notices
from study.models.cuda_graph import GraphedStep, graphs_enabled
from study.models.step_lstm import _cell_backward, _cell_forward
from study.packed_train import _Pack, train_packed
from study.repro import derive_seed
from study.tasks.copying import Copying
from study.train import train
from study.trial import TrialState
from study.vocabulary import DIVERGED

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BASE = dict(
    task="copying",
    task_options={"T": 5, "train_size": 400, "val_size": 60},
    hidden_size=12,
    batch_size=16,
    iterations=20,
    eval_every=10,
)


@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notices, "_said", set())


def _counter_step() -> tuple[torch.Tensor, GraphedStep]:
    state = torch.zeros(())
    return state, GraphedStep(lambda: state.add_(1), [state], torch.device("cpu"))


def test_cpu_steps_run_eagerly_and_say_so_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=notices.__name__)
    state, step = _counter_step()
    _, other = _counter_step()
    for _ in range(3):
        step()
    other()
    assert state.item() == 3 and not step.captured
    assert sum("runs eagerly" in record.message for record in caplog.records) == 1


def test_environment_switch_turns_capture_off(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger=notices.__name__)
    monkeypatch.setenv(cuda_graph.ENV_SWITCH, "0")
    assert not graphs_enabled(torch.device("cuda"))
    assert not graphs_enabled(torch.device("cuda"))
    assert sum(cuda_graph.ENV_SWITCH in record.message for record in caplog.records) == 1


def test_capture_failure_restores_state_runs_eagerly_and_warns_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing_capture(self: GraphedStep) -> None:
        for _ in range(cuda_graph.WARMUP_STEPS):  # the warm-up really updates the state
            self.step()
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedStep, "_warm_up_and_capture", failing_capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            state, step = _counter_step()
            step.eager = False  # as on a GPU
            step()
            step()
            assert state.item() == 2  # warm-up undone; both calls were real steps
            assert step.eager and not step.captured
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "CUDA graph capture failed, training steps run eagerly: "
        "operation not permitted when stream is capturing"
    ]


def test_cpu_pack_has_no_graph() -> None:
    config = TrialConfig(**BASE)
    pack = _Pack([TrialState(config, torch.device("cpu"))], torch.device("cpu"))
    assert pack.graphed is None


# --- on a GPU ---------------------------------------------------------------------------------


def _poison(monkeypatch: pytest.MonkeyPatch, seed: int, iteration: int) -> None:
    original = Copying.train_batch
    data_seed = derive_seed(seed, "data_order")

    def train_batch(self: Copying, it: int, batch_size: int, seed_: int):
        x, y = original(self, it, batch_size, seed_)
        return (x * float("nan"), y) if (seed_ == data_seed and it == iteration) else (x, y)

    monkeypatch.setattr(Copying, "train_batch", train_batch)


def _assert_close_curves(ours: list[dict], theirs: list[dict], rtol: float) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys() and a["iteration"] == b["iteration"]
        for key in a:
            if math.isnan(b[key]):
                assert math.isnan(a[key])
            elif key.endswith("accuracy"):
                assert abs(a[key] - b[key]) <= 0.05, key  # a few borderline predictions
            else:
                assert a[key] == pytest.approx(b[key], rel=rtol, abs=1e-6), key


@pytest.mark.cuda
@CUDA
def test_fused_cells_match_the_reference_cells() -> None:
    torch.manual_seed(0)
    rows, hidden = 7, 5
    args = [
        torch.randn(rows, 4 * hidden),
        torch.randn(rows, 4 * hidden),
        torch.randn(rows, hidden),
    ]
    args = [a.double() for a in args]
    expected = _cell_forward(*args)
    actual = _cell_forward(*[a.cuda() for a in args])
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=0, atol=1e-12)
    hy, cy, workspace = expected
    grads = [torch.randn_like(hy), torch.randn_like(cy)]
    for grad_cy in (grads[1], None):
        cpu = _cell_backward(grads[0], grad_cy, args[2], cy, workspace)
        gpu = _cell_backward(
            grads[0].cuda(),
            None if grad_cy is None else grad_cy.cuda(),
            args[2].cuda(),
            cy.cuda(),
            workspace.cuda(),
        )
        for ours, theirs in zip(gpu, cpu, strict=True):
            torch.testing.assert_close(ours.cpu(), theirs, rtol=0, atol=1e-12)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("masks", ["none", "h", "c"])
def test_detach_lstm_on_cuda_has_the_cpu_gradients(masks: str) -> None:
    torch.manual_seed(1)
    lstm = DetachLSTM(3, 16).double()
    x = torch.randn(30, 8, 3, dtype=torch.float64)
    mask = torch.rand(30) < 0.3
    detach_h = mask if masks == "h" else None
    detach_c = mask if masks == "c" else None
    grad_out = torch.randn(30, 8, 16, dtype=torch.float64)

    def grads(model: DetachLSTM, device: str) -> list[torch.Tensor]:
        def on(t):
            return None if t is None else t.to(device)

        output = model(x.to(device), detach_h=on(detach_h), detach_c=on(detach_c))[0]
        loss = (output * grad_out.to(device)).sum()
        return [g.cpu() for g in torch.autograd.grad(loss, list(model.parameters()))]

    expected = grads(lstm, "cpu")
    actual = grads(lstm.cuda(), "cuda")
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.cuda
@CUDA
def test_detach_lstm_on_cuda_without_masks_has_cudnn_gradients(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuDNN RNNs may use TF32
    torch.manual_seed(2)
    ours = DetachLSTM(1, 64).cuda()
    reference = torch.nn.LSTM(1, 64).cuda()
    reference.load_state_dict(ours.state_dict())
    x = torch.rand(100, 32, 1, device="cuda")
    grad_out = torch.randn(100, 32, 64, device="cuda")
    for model in (ours, reference):
        (model(x)[0] * grad_out).sum().backward()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_cuda_steps_never_wait_for_the_device(graphs: str, monkeypatch) -> None:
    monkeypatch.setenv(cuda_graph.ENV_SWITCH, graphs)
    configs = [
        TrialConfig(**BASE, device="cuda", method="h_detach", p_detach=0.5, seed=s)
        for s in range(3)
    ]
    device = torch.device("cuda")
    pack = _Pack([TrialState(config, device) for config in configs], device)
    pack.step(0)  # capture (or the first eager step) may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for iteration in range(1, 6):
            pack.step(iteration)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pack.graphed is not None and pack.graphed.captured == (graphs == "1")
    assert pack.read_window().count == [6, 6, 6]


@pytest.mark.cuda
@CUDA
def test_cuda_pack_matches_cpu_solo_runs_and_freezes_a_diverged_member(monkeypatch) -> None:
    _poison(monkeypatch, seed=4, iteration=13)
    # Evaluation runs cuDNN's LSTM, which may use TF32 by default: compare in full float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    configs = [
        TrialConfig(**BASE, method="h_detach", p_detach=0.5, lr=1e-2, seed=1),
        TrialConfig(**BASE, lr=3e-3, clip_norm=None, seed=2),
        TrialConfig(**BASE, method="c_detach", p_detach=0.25, clip_norm=0.5, seed=3),
        TrialConfig(**BASE, method="h_detach", p_detach=0.25, seed=4),
    ]
    cpu = [train(config) for config in configs]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture fails the test
        gpu = train_packed([config.replace(device="cuda") for config in configs])
    for ours, theirs in zip(gpu, cpu, strict=True):
        assert ours.status == theirs.status
        _assert_close_curves(ours.curve, theirs.curve, rtol=1e-3)
    assert gpu[3].status == DIVERGED and gpu[3].curve[-1]["iteration"] == 14


@pytest.mark.cuda
@CUDA
def test_graphed_and_eager_cuda_runs_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrialConfig(**BASE, device="cuda", method="h_detach", p_detach=0.25)
    graphed = train(config)
    monkeypatch.setenv(cuda_graph.ENV_SWITCH, "0")
    eager = train(config)
    _assert_close_curves(graphed.curve, eager.curve, rtol=1e-4)


def test_step_benchmark_smoke_runs_without_a_gpu() -> None:
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/lstm_step_cuda.py",
            "--smoke",
            "--members",
            "2",
            "--triton-sweep",
        ],  # fmt: skip
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "STEP 2 packed h-detach trials, per trial, precision fp32 [per-step]" in result.stdout
    targets = [line for line in result.stdout.splitlines() if line.startswith("target <= ")]
    assert len(targets) == 2 * 3, targets  # two shapes, three targets each
    assert all(line.split(": ")[1].split()[1] in ("met", "MISSED") for line in targets), targets
    sweep = result.stdout.split("Triton sweep")[1].splitlines()
    kernels = [line[:36].strip() for line in sweep if line.startswith("Triton split")]
    counts = {kernel: kernels.count(kernel) for kernel in kernels}
    assert counts == {
        "Triton split tf32": 3,  # the default at its own warps (auto), 4 and 8
        "Triton split tagged tf32": 1,
        "Triton split partials tf32": 2,
        "Triton split tagged partials tf32": 2,
    }, sweep


def test_step_benchmark_skips_only_the_variants_of_a_failed_feature() -> None:
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "lstm_step_cuda.py"
    spec = importlib.util.spec_from_file_location("lstm_step_cuda", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    every = ["tagged", "partials", "tagged partials"]
    assert benchmark.variant_paths(True, set()) == [f"Triton split {v} tf32" for v in every]
    assert benchmark.variant_paths(True, {"tagged"}) == ["Triton split partials tf32"]
    assert benchmark.variant_paths(True, {"partials"}) == ["Triton split tagged tf32"]
    assert benchmark.variant_paths(False, set()) == []
    # Each variant's path sets exactly its features' switches on top of the split tf32 path.
    both = benchmark.PATHS["Triton split tagged partials tf32"]
    assert both["HDETACH_TRITON_SPLIT_SYNC"] == "tagged"
    assert both["HDETACH_TRITON_SPLIT_BACKWARD"] == "partials"
    assert "HDETACH_TRITON_SPLIT_BACKWARD" not in benchmark.PATHS["Triton split tagged tf32"]
