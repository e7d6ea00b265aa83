"""train_packed: every member's curve, reports and checkpoints equal its solo train() run."""

from __future__ import annotations

import copy
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from study import packed_train
from study.config import TrialConfig
from study.errors import ConfigError
from study.packed_train import check_packable, pack_key, train_packed
from study.repro import derive_seed
from study.tasks import make_task
from study.tasks.copying import Copying
from study.tasks.mnist_data import IDX_FILES
from study.train import train
from study.trial import Progress
from study.vocabulary import COMPLETED, DIVERGED

COPYING = {"T": 5, "train_size": 400, "val_size": 60}
BASE = dict(task="copying", task_options=COPYING, hidden_size=12, batch_size=16, iterations=30)


def _recorder() -> tuple[list[tuple[int, dict[str, float], str]], list[dict[str, Any]], Any]:
    seen: list[tuple[int, dict[str, float], str]] = []
    checkpoints: list[dict[str, Any]] = []

    def report(progress: Progress) -> None:
        seen.append((progress.iteration, dict(progress.metrics), progress.status))
        checkpoints.append(progress.checkpoint())

    return seen, checkpoints, report


def _assert_same_state(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    if isinstance(theirs, torch.Tensor):
        assert torch.equal(ours, theirs)
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys()
        for key in theirs:
            _assert_same_state(ours[key], theirs[key])
    elif isinstance(theirs, list | tuple):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _assert_same_state(a, b)
    else:
        both_nan = isinstance(ours, float) and math.isnan(ours) and math.isnan(theirs)
        assert both_nan or ours == theirs


def _poison(monkeypatch: pytest.MonkeyPatch, seed: int, iteration: int) -> None:
    """NaN inputs for one trial's batch at one iteration (found by its data-order seed)."""
    original = Copying.train_batch
    data_seed = derive_seed(seed, "data_order")

    def train_batch(self: Copying, it: int, batch_size: int, seed_: int):
        x, y = original(self, it, batch_size, seed_)
        if seed_ == data_seed and it == iteration:
            x = x * float("nan")
        return x, y

    monkeypatch.setattr(Copying, "train_batch", train_batch)


def test_packed_members_equal_their_solo_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, seed=4, iteration=13)
    configs = [
        TrialConfig(**BASE, eval_every=10, method="h_detach", p_detach=0.5, lr=1e-2, seed=1),
        TrialConfig(**BASE, eval_every=10, method="none", lr=3e-3, clip_norm=None, seed=2),
        TrialConfig(
            **BASE,
            eval_every=10,
            method="c_detach",
            p_detach=0.25,
            lr=1e-3,
            clip_norm=0.5,
            anneal_last=10,
            seed=3,
        ),
        TrialConfig(**BASE, eval_every=10, method="h_detach", p_detach=0.25, lr=2e-3, seed=4),
    ]
    solo_runs = []
    for config in configs:
        seen, checkpoints, report = _recorder()
        solo_runs.append((train(config, report), seen, checkpoints))
    recorders = [_recorder() for _ in configs]
    packed = train_packed(configs, [report for _, _, report in recorders])
    for (solo, solo_seen, solo_checkpoints), result, (seen, checkpoints, _) in zip(
        solo_runs, packed, recorders, strict=True
    ):
        assert result.status == solo.status
        _assert_same_state(result.curve, solo.curve)  # exact: the same floats, not merely close
        _assert_same_state(seen, solo_seen)
        if result.status == COMPLETED:
            for ours, theirs in zip(checkpoints, solo_checkpoints, strict=True):
                _assert_same_state(ours, theirs)
    diverged = packed[3]
    assert diverged.status == DIVERGED and diverged.curve[-1]["iteration"] == 14
    assert math.isnan(diverged.curve[-1]["train/loss"])
    assert [r.status for r in packed[:3]] == [COMPLETED] * 3


def test_sgd_pack_equals_solo_runs() -> None:
    configs = [
        TrialConfig(**BASE, eval_every=15, optimizer="sgd", lr=0.1, seed=5),
        TrialConfig(
            **BASE, eval_every=15, optimizer="sgd", lr=0.03, method="h_detach", p_detach=0.5
        ),
    ]
    packed = train_packed(configs)
    for config, result in zip(configs, packed, strict=True):
        assert result.curve == train(config).curve


def test_tf32_precision_changes_nothing_on_a_cpu() -> None:
    fp32 = TrialConfig(**BASE, eval_every=15, method="h_detach", p_detach=0.5, precision="fp32")
    tf32 = fp32.replace(precision="tf32")
    with pytest.raises(ConfigError, match="precision must be equal across a pack"):
        check_packable([fp32, tf32])
    assert train_packed([tf32])[0].curve == train(fp32).curve


def test_auto_precision_is_fp32_on_a_cpu_bit_for_bit() -> None:
    # The default since issue 18: a CPU study's curves are those it had under fp32.
    short = {**BASE, "iterations": 10}
    fp32 = [
        TrialConfig(**short, eval_every=5, method="h_detach", p_detach=0.5, precision="fp32"),
        TrialConfig(**short, eval_every=5, lr=5e-3, seed=3, precision="fp32"),
    ]
    auto = [config.replace(precision="auto") for config in fp32]
    assert auto[0] == TrialConfig(**short, eval_every=5, method="h_detach", p_detach=0.5)
    assert train(auto[0]).curve == train(fp32[0]).curve
    packed_auto, packed_fp32 = train_packed(auto), train_packed(fp32)
    for ours, theirs in zip(packed_auto, packed_fp32, strict=True):
        assert ours.curve == theirs.curve and ours.config.precision == "auto"


@pytest.mark.parametrize("precision,allowed", [("fp32", False), ("tf32", True), ("auto", True)])
def test_cuda_precision_sets_tf32_for_the_run_and_restores_it(precision, allowed) -> None:
    # Only flags are set, so this runs without a GPU.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with packed_train.cuda_precision(precision, torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32 is allowed
        assert torch.backends.cudnn.allow_tf32 is allowed
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
    with packed_train.cuda_precision(precision, torch.device("cpu")):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_resume_crosses_between_packed_and_solo_runs() -> None:
    configs = [
        TrialConfig(**BASE, eval_every=10, method="h_detach", p_detach=0.5, seed=6),
        TrialConfig(**BASE, eval_every=10, lr=5e-3, seed=7),
    ]
    uninterrupted = [train(config) for config in configs]
    recorders = [_recorder() for _ in configs]
    train_packed(configs, [report for _, _, report in recorders])
    middle = [checkpoints[0] for _, checkpoints, _ in recorders]  # taken at iteration 10
    # A packed member's checkpoint resumes alone, and solo checkpoints resume as a pack.
    # (A deep copy: train() resumes by loading tensors that it then updates in place.)
    assert train(configs[0], resume_from=copy.deepcopy(middle[0])).curve == uninterrupted[0].curve
    resumed = train_packed(configs, resume_from=middle)
    assert [r.curve for r in resumed] == [r.curve for r in uninterrupted]


def _write_idx(folder: Path, train: int = 30, test: int = 10) -> Path:
    folder.mkdir(parents=True)
    pixels = torch.Generator().manual_seed(0)

    def images(n: int) -> bytes:
        data = torch.randint(0, 256, (n * 784,), generator=pixels, dtype=torch.uint8)
        return struct.pack(">IIII", 2051, n, 28, 28) + data.numpy().tobytes()

    def labels(n: int) -> bytes:
        return struct.pack(">II", 2049, n) + bytes(i % 10 for i in range(n))

    for name, data in zip(
        IDX_FILES, [images(train), labels(train), images(test), labels(test)], strict=True
    ):
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def mnist_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Task options of a 24-image train split (6 validate) in IDX files, with a private cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return {"data_dir": str(_write_idx(tmp_path / "idx")), "val_size": 6}


def test_permuted_mnist_pack_reads_the_last_step_and_equals_solo(
    mnist_options: dict[str, Any],
) -> None:
    options = mnist_options
    base = dict(task_options=options, hidden_size=6, batch_size=6, iterations=4, eval_every=2)
    # Members with their own permutation get their own task object; shapes still match.
    authors = {**options, "permutation_seed": "seed"}
    configs = [
        TrialConfig(task="permuted_mnist", method="h_detach", p_detach=0.25, seed=1, **base),
        TrialConfig(task="permuted_mnist", seed=2, lr=3e-3, **{**base, "task_options": authors}),
    ]
    packed = train_packed(configs)
    for config, result in zip(configs, packed, strict=True):
        assert "test/accuracy" in result.final
        assert result.curve == train(config).curve


def test_pixel_mnist_members_sharing_one_task_object_keep_their_own_data_order(
    mnist_options: dict[str, Any],
) -> None:
    # 24 training images in batches of 6: 4 iterations per epoch, so 6 cross into a second.
    base = dict(task_options=mnist_options, hidden_size=6, batch_size=6, iterations=6)
    configs = [TrialConfig(task="pixel_mnist", seed=seed, eval_every=3, **base) for seed in (1, 2)]
    first, second = packed_train._shared_tasks(configs)
    assert first is second
    packed = train_packed(configs)
    solo = [train(config).curve for config in configs]
    assert [result.curve for result in packed] == solo and solo[0] != solo[1]


@pytest.mark.parametrize("name", ["copying", "pixel_mnist"])
def test_a_packs_batched_loss_is_each_members_loss(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if name == "copying":
        task = make_task("copying", COPYING, 0)
    else:
        task = make_task(name, {"data_dir": str(_write_idx(tmp_path / "idx")), "val_size": 6}, 0)
    batches = [task.train_batch(i, 5, seed=0) for i in range(3)]
    classes = task.num_classes
    logits = torch.randn(3, task.readout_steps, 5, classes)
    losses = task.loss(logits, torch.stack([y for _, y in batches]))  # the device step's call
    assert losses.shape == (3,)
    for k, (_, y) in enumerate(batches):
        expected = task.loss(logits[k], y)  # the solo run's call
        torch.testing.assert_close(losses[k], expected, rtol=1e-6, atol=1e-7)


def test_packs_need_shared_shapes_and_schedule() -> None:
    a = TrialConfig(**BASE, seed=1)
    assert pack_key(a) == pack_key(a.replace(seed=2, lr=0.1, clip_norm=None))
    with pytest.raises(ConfigError, match="hidden_size"):
        check_packable([a, a.replace(hidden_size=8)])
    with pytest.raises(ConfigError, match="same shapes"):
        train_packed([a, a.replace(task_options={**COPYING, "T": 6})])


def test_device_step_on_cpu_tracks_solo_runs_with_deferred_divergence_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The GPU step's arithmetic (reference cells instead of fused kernels, no capture), its
    # batched loss, norms and Adam with per-member device scalars, and divergence read back
    # every DIVERGENCE_CHECK_EVERY steps rather than every step.
    monkeypatch.setattr(packed_train, "_device_steps", lambda device: True)
    monkeypatch.setattr(packed_train, "DIVERGENCE_CHECK_EVERY", 7)
    _poison(monkeypatch, seed=4, iteration=13)
    configs = [
        TrialConfig(**BASE, eval_every=10, method="h_detach", p_detach=0.5, lr=1e-2, seed=1),
        TrialConfig(**BASE, eval_every=10, lr=3e-3, clip_norm=None, seed=2),
        TrialConfig(**BASE, eval_every=10, method="h_detach", p_detach=0.25, lr=2e-3, seed=4),
    ]
    seen, _, report = _recorder()
    packed = train_packed(configs, [None, None, report])
    for config, result in zip(configs, packed, strict=True):
        solo = train(config)
        assert result.status == solo.status
        assert [p["iteration"] for p in result.curve] == [p["iteration"] for p in solo.curve]
        for ours, theirs in zip(result.curve, solo.curve, strict=True):
            for key, value in theirs.items():
                if math.isnan(value):
                    assert math.isnan(ours[key])
                elif key.endswith("accuracy"):
                    assert abs(ours[key] - value) <= 0.05
                else:
                    assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert [(iteration, status) for iteration, _, status in seen] == [
        (10, "running"),
        (14, DIVERGED),
    ]
