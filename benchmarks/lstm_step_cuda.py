"""ms per training step on CUDA: h-detach (per-step, Triton) vs cuDNN nn.LSTM and the authors' loop

Run from the repository root: `PYTHONPATH=. python benchmarks/lstm_step_cuda.py`. Needs torch only
(no Ray, MLflow or data sets: inputs are random, shaped as the paper's tasks). Every number comes
from this one run, so the ratios compare like with like. Medians over rounds. `--triton-sweep`
times the Triton kernels' block size, warps and precision at the pixel-MNIST shape.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from operator import itemgetter

import torch
import torch.nn.functional as F
from torch import nn

from study.config import TrialConfig
from study.models import SequenceClassifier, triton_lstm
from study.models.cuda_graph import GraphedStep
from study.packed_train import _Pack, cuda_precision
from study.tasks.base import Task, mean_cross_entropy
from study.trial import TrialState

# (name, T, B, H, classes, readout): the copying task at T=100 and pixel MNIST (paper Sec. 5).
SHAPES = [
    ("copying T=100", 120, 100, 128, 9, "all"),
    ("pixel MNIST", 784, 100, 100, 10, "last"),
]
P_DETACH = 0.25
# How the masked LSTM runs: the eager per-step kernels (one GEMM + one fused cell per step), or
# the persistent Triton kernels with tl.dot in full fp32 ("ieee", the default: torch's
# allow_tf32 is False), TF32 (as cuDNN's default), or 3xTF32.
PATHS = {
    "per-step": {triton_lstm.ENV_SWITCH: "0"},
    "Triton fp32-ieee": {triton_lstm.ENV_PRECISION: "ieee", triton_lstm.ENV_KERNEL: "rows"},
    "Triton tf32": {triton_lstm.ENV_PRECISION: "tf32", triton_lstm.ENV_KERNEL: "rows"},
    "Triton 3xtf32": {triton_lstm.ENV_PRECISION: "tf32x3", triton_lstm.ENV_KERNEL: "rows"},
    # The hidden-split kernels (study/models/triton_split.py), one trial at a time.
    "Triton split fp32-ieee": {triton_lstm.ENV_PRECISION: "ieee", triton_lstm.ENV_KERNEL: "split"},
    "Triton split tf32": {triton_lstm.ENV_PRECISION: "tf32", triton_lstm.ENV_KERNEL: "split"},
}
SPLIT = ("Triton split fp32-ieee", "Triton split tf32")
# The split kernels' variants, as "Triton split <variant> tf32" paths: the tagged exchange
# (triton_split.exchange()) and the backward's partial sums (triton_split.backward()), alone and
# together. Each needs its features; --no-<feature> skips the rows of one that failed.
VARIANTS = {
    "tagged": {"tagged"},
    "partials": {"partials"},
    "tagged partials": {"tagged", "partials"},
}
FEATURES = {
    "tagged": {triton_lstm.ENV_SPLIT_SYNC: "tagged"},
    "partials": {triton_lstm.ENV_SPLIT_BACKWARD: "partials"},
}
for _variant, _needs in VARIANTS.items():
    PATHS[f"Triton split {_variant} tf32"] = {
        triton_lstm.ENV_PRECISION: "tf32",
        triton_lstm.ENV_KERNEL: "split",
        **{key: value for feature in sorted(_needs) for key, value in FEATURES[feature].items()},
    }


def variant_paths(split: bool, skipped: set[str]) -> list[str]:
    """The PATHS names of the variants to time: none without split, none needing a skipped one."""
    if not split:
        return []
    return [f"Triton split {v} tf32" for v, needs in VARIANTS.items() if not needs & skipped]


@contextmanager
def lstm_path(name: str, **env: str) -> Iterator[None]:
    """Run the masked LSTM as PATHS[name] (plus env overrides); TF32 GEMMs on the tf32 path."""
    settings = {**PATHS[name], **env}
    saved = {key: os.environ.get(key) for key in settings}
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    os.environ.update(settings)
    torch.backends.cuda.matmul.allow_tf32 = name.endswith(" tf32")
    triton_lstm._failed.clear()
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def path_note(name: str, graphed: GraphedStep | None = None) -> str:
    """What went wrong in a row, so a fallback is never read as a speed."""
    notes = []
    if name.startswith("Triton") and triton_lstm._failed:
        notes.append("FELL BACK to per-step")
    if name.startswith("Triton") and not torch.cuda.is_available():
        notes.append("no GPU: the eager CPU path ran")
    if graphed is not None and graphed.device.type == "cuda" and not graphed.captured:
        notes.append("capture failed: eager")
    return f" [{'; '.join(notes)}]" if notes else ""


def release() -> None:
    """Free the last rows' packs and graphs (a pack and its GraphedStep form a cycle)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class RandomTask(Task):
    """Random inputs and labels with a real task's shapes (batches made on the host, as real)."""

    name = "random"
    input_size = 1
    eval_splits = ("val",)
    default_target = 1.0

    def __init__(self, seq_len: int, num_classes: int, readout: str) -> None:
        self.seq_len, self.readout_steps = seq_len, _readout_steps(readout) or seq_len
        self.num_classes = num_classes  # type: ignore[misc]

    def train_batch(self, iteration: int, batch_size: int, seed: int) -> tuple:
        generator = torch.Generator().manual_seed(seed + iteration)
        x = torch.rand(self.seq_len, batch_size, 1, generator=generator)
        shape = (batch_size,) if self.readout_steps == 1 else (self.seq_len, batch_size)
        return x, torch.randint(0, self.num_classes, shape, generator=generator)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple]:
        yield self.train_batch(0, batch_size, 0)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.readout_steps == 1:
            return mean_cross_entropy(logits[..., -1, :, :], targets, item_dims=1)
        return mean_cross_entropy(logits, targets, item_dims=2)

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        return 0, 1


def _readout_steps(readout: str) -> int | None:
    """A shape's read-out as the models take it: every step (None) or the last one."""
    return None if readout == "all" else 1


def _loss(logits: torch.Tensor, y: torch.Tensor, readout: str) -> torch.Tensor:
    if readout == "last":
        return F.cross_entropy(logits[-1], y)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class AuthorsLoop(nn.Module):
    """The authors' formulation: a Python loop over LSTM cells, `h = h.detach()` with prob. p."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(1, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, readout: str) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[1], self.cell.hidden_size)
        outputs = []
        for t in range(x.shape[0]):
            if random.random() < P_DETACH:
                h = h.detach()
            h, c = self.cell(x[t], (h, c))
            outputs.append(h)
        return self.head(h.unsqueeze(0) if readout == "last" else torch.stack(outputs))


def time_steps(step: Callable[[], object], steps: int, rounds: int) -> float:
    """Median over rounds of the mean ms per step, after a warm-up (CUDA events on a GPU)."""
    step()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(steps):
            step()
        if cuda:
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / steps)
        else:
            samples.append((time.perf_counter() - started) * 1e3 / steps)
    return statistics.median(samples)


def pack_step(
    shape: tuple[int, int, int, int, str], members: int, device: torch.device, precision: str
) -> Callable[[], None]:
    """The study's whole training step (host batch, copy, forward, loss, backward, clip, Adam).

    Time it inside `cuda_precision(precision, device)`, as train_packed runs it.
    """
    seq_len, batch, hidden, classes, readout = shape
    task = RandomTask(seq_len, classes, readout)
    configs = [
        TrialConfig(
            hidden_size=hidden,
            batch_size=batch,
            method="h_detach",
            p_detach=P_DETACH,
            seed=k,
            device=device.type,
            precision=precision,
        )
        for k in range(members)
    ]
    with cuda_precision(precision, device):
        pack = _Pack([TrialState(config, device, task) for config in configs], device)
    counter = iter(range(10**9))
    return lambda: pack.step(next(counter))


def study_step(
    shape: tuple[int, int, int, int, str],
    members: int,
    device: torch.device,
    precision: str,
    rounds: int,
    steps: int,
) -> tuple[float, str]:
    """ms per study training step of a pack of `members` at the trial field `precision`, and
    which LSTM kernels it ran."""
    forget_kernels()
    with cuda_precision(precision, device):
        ms = time_steps(pack_step(shape, members, device, precision), steps, rounds)
    release()
    return ms, kernels_used()


def forget_kernels() -> None:
    """Start a fresh record of the LSTM kernels that run (triton_lstm.used), and forget the
    configurations that failed before (each is tried again, and a fallback is seen anew)."""
    triton_lstm._failed.clear()
    triton_lstm.used.clear()


def kernels_used() -> str:
    """The LSTM kernels run since forget_kernels, as a row's label ("Triton split", "per-step")."""
    names = sorted(triton_lstm.used) or ["per-step"]
    return ", ".join(name if name == "per-step" else f"Triton {name}" for name in names)


def measure_shape(
    shape: tuple[int, int, int, int, str],
    rounds: int,
    members: int,
    device: torch.device,
    split: bool,
    variants: list[str],
) -> list[tuple[str, float]]:
    """(implementation, median ms per step) rows for one task shape; `variants`: PATHS names
    of the split variants to time too (variant_paths)."""
    seq_len, batch, hidden, classes, readout = shape
    x = torch.rand(seq_len, batch, 1, device=device)
    y_shape = (seq_len, batch) if readout == "all" else (batch,)
    y = torch.randint(0, classes, y_shape, device=device)
    steps = (20 if seq_len < 500 else 5) if device.type == "cuda" else 2
    rows = []

    def forward_backward(model: nn.Module, forward: Callable[[], torch.Tensor]) -> Callable:
        parameters = list(model.parameters())
        return lambda: torch.autograd.grad(_loss(forward(), y, readout), parameters)

    loop = AuthorsLoop(hidden, classes).to(device)
    loop_step = forward_backward(loop, lambda: loop(x, readout))
    loop_steps = 3 if seq_len > 500 else steps
    rows.append(("authors' loop, h.detach()", time_steps(loop_step, loop_steps, rounds)))

    lstm, head = nn.LSTM(1, hidden).to(device), nn.Linear(hidden, classes).to(device)
    cudnn = nn.ModuleList([lstm, head])

    def cudnn_forward() -> torch.Tensor:
        output, (h_n, _) = lstm(x)
        return head(h_n if readout == "last" else output)

    rows.append(
        (
            "nn.LSTM (cuDNN), no detach",
            time_steps(forward_backward(cudnn, cudnn_forward), steps, rounds),
        )
    )
    fp32_cudnn = forward_backward(cudnn, cudnn_forward)
    saved_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    rows.append(("nn.LSTM (cuDNN), allow_tf32=False", time_steps(fp32_cudnn, steps, rounds)))
    torch.backends.cudnn.allow_tf32 = saved_tf32

    template = SequenceClassifier(1, hidden, classes).to(device)
    mask = (torch.rand(seq_len) < P_DETACH).to(device)

    def detach_lstm_step() -> Callable:
        # A fresh copy per row: a model whose parameters already took part in an eager backward
        # on the default stream must not be captured on another stream (stale AccumulateGrad).
        model = SequenceClassifier(1, hidden, classes).to(device)
        model.load_state_dict(template.state_dict())
        steps_read = _readout_steps(readout)
        return forward_backward(model, lambda: model(x, mask, readout_steps=steps_read))

    cuda = device.type == "cuda"
    with lstm_path("per-step"):
        rows.append(
            ("DetachLSTM p=0.25, per-step, eager", time_steps(detach_lstm_step(), steps, rounds))
        )
        graphed = GraphedStep(detach_lstm_step(), [], device)
        ms = time_steps(graphed, steps, rounds)
        rows.append(("DetachLSTM p=0.25, per-step, CUDA graph" + path_note("", graphed), ms))
    triton_paths = ("Triton fp32-ieee", "Triton tf32", *(SPLIT if split else ()), *variants)
    for name in triton_paths if cuda else ():
        with lstm_path(name):
            graphed = GraphedStep(detach_lstm_step(), [], device)
            ms = time_steps(graphed, steps, rounds)
            rows.append((f"DetachLSTM p=0.25, {name}, CUDA graph" + path_note(name, graphed), ms))
    release()

    optimizer = torch.optim.Adam(cudnn.parameters(), lr=1e-3)

    def cudnn_train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(cudnn_forward(), y, readout).backward()
        torch.nn.utils.clip_grad_norm_(cudnn.parameters(), 1.0)
        optimizer.step()

    rows.append(("STEP nn.LSTM + clip + Adam, eager", time_steps(cudnn_train_step, steps, rounds)))
    task_shape = (seq_len, batch, hidden, classes, readout)
    # The study's own step at each `precision` (trial field), on the kernels the study picks
    # (named in brackets). "per trial" rows divide a pack's step by its size.
    for precision in ("fp32", "tf32") if cuda else ("fp32",):
        solo, kernels = study_step(task_shape, 1, device, precision, rounds, steps)
        note = path_note("Triton")
        rows.append((f"STEP h-detach trial, precision {precision} [{kernels}]{note}", solo))
        packed, kernels = study_step(task_shape, members, device, precision, rounds, steps)
        note = path_note("Triton")
        label = f"STEP {members} packed h-detach trials, per trial, precision {precision}"
        rows.append((f"{label} [{kernels}]{note}", packed / members))
    for name in variants if cuda else ():
        with lstm_path(name):
            solo, kernels = study_step(task_shape, 1, device, "tf32", rounds, steps)
        note = path_note("Triton")
        variant = name.removeprefix("Triton split ").removesuffix(" tf32")
        rows.append((f"STEP h-detach trial, precision tf32, {variant} [{kernels}]{note}", solo))
    return rows


def target_verdicts(rows: dict[str, float], members: int) -> list[str]:
    """Issue 5's per-shape targets, read off one shape's rows: h-detach at most 1.5x cuDNN (the
    fastest graphed forward + backward against cuDNN's, and the fastest whole training step
    against cuDNN's), and the fastest packed trial's share at most 0.5x of cuDNN's step."""
    cudnn, cudnn_step = "nn.LSTM (cuDNN), no detach", "STEP nn.LSTM + clip + Adam, eager"
    verdicts = []
    for prefix, baseline, target in (
        ("DetachLSTM p=0.25,", cudnn, 1.5),
        ("STEP h-detach trial,", cudnn_step, 1.5),
        (f"STEP {members} packed h-detach trials,", cudnn_step, 0.5),
    ):
        candidates = [(k, v) for k, v in rows.items() if k.startswith(prefix)]
        label, ms = min(candidates, key=itemgetter(1))
        ratio = ms / rows[baseline]
        verdict = "met" if ratio <= target else "MISSED"
        verdicts.append(f"target <= {target} x {baseline}: {ratio:.2f} {verdict} ({label})")
    return verdicts


def triton_sweep(
    rounds: int, device: torch.device, split: bool, variants: list[str], smoke: bool
) -> None:
    """Forward + backward at the pixel-MNIST shape, graphed, per Triton configuration; and the
    forward alone (graphed, grad enabled: it saves what the backward would read), so that the
    two kernels' shares show (bwd ms: the difference, the backward with its weight gradients)."""
    _, seq_len, batch, hidden, classes, readout = SHAPES[1]
    if smoke:  # the script's own check, on any device (a CPU runs every row eagerly)
        seq_len, batch, hidden = 12, 4, 8
    x = torch.rand(seq_len, batch, 1, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    mask = (torch.rand(seq_len) < P_DETACH).to(device)
    template = SequenceClassifier(1, hidden, classes).to(device)
    lstm, head = nn.LSTM(1, hidden).to(device), nn.Linear(hidden, classes).to(device)
    parameters = [*lstm.parameters(), *head.parameters()]

    def cudnn_step() -> tuple:
        _, (h_n, _) = lstm(x)
        return torch.autograd.grad(_loss(head(h_n), y, readout), parameters)

    cudnn = time_steps(cudnn_step, 5, rounds)
    print(f"\nTriton sweep, pixel MNIST (T={seq_len}, B={batch}, H={hidden}), forward + backward")
    print(f"nn.LSTM (cuDNN, TF32 default): {cudnn:.2f} ms")
    print(
        f"{'kernel':<36}{'tile':>8}{'warps':>7}{'ms':>9}{'/ cuDNN':>9}{'fwd ms':>9}{'bwd ms':>9}"
    )
    # (kernel, batch rows, hidden units per program (split only), warps: "auto" is
    # triton_split.default_warps, which may differ between the forward and the backward; a
    # number sets both). TF32 only: full fp32 is not the study's path there (rows kernels
    # measured 2.5-3.4x slower than the per-step kernels on an H100, whatever the warps). Split:
    # 16 units only (32 measured slower in every variant on an H100: benchmarks/results).
    configs = [("Triton tf32", 16, 0, w) for w in ("4", "8")]
    if split:
        configs += [("Triton split tf32", 16, 16, w) for w in ("auto", "4", "8")]
    # Tagged gates: 8 warps only (4 spill there).
    sweeps = {
        "Triton split tagged tf32": ((16, "8"),),
        "Triton split partials tf32": ((16, "auto"), (16, "8")),
        "Triton split tagged partials tf32": ((16, "auto"), (16, "4")),
    }
    for name in variants:
        configs += [(name, 16, units, warps) for units, warps in sweeps[name]]
    for name, block_b, units, warps in configs:
        model = SequenceClassifier(1, hidden, classes).to(device)
        model.load_state_dict(template.state_dict())
        params = list(model.parameters())

        def forward(model: nn.Module = model) -> torch.Tensor:
            return _loss(model(x, mask, readout_steps=_readout_steps(readout)), y, readout)

        def step(forward: Callable = forward, params: list = params) -> tuple:
            return torch.autograd.grad(forward(), params)

        env = {triton_lstm.ENV_BLOCK_B: str(block_b), triton_lstm.ENV_WARPS: warps}
        env[triton_lstm.ENV_SPLIT_WARPS] = warps
        env[triton_lstm.ENV_SPLIT_UNITS] = str(units or 16)
        with lstm_path(name, **env):
            graphed = GraphedStep(step, [], device)
            ms = time_steps(graphed, 5, rounds)
            graphed_forward = GraphedStep(forward, [], device)
            forward_ms = time_steps(graphed_forward, 5, rounds)
            note = path_note(name, graphed) or path_note(name, graphed_forward)
        tile = f"{block_b}x{units}" if units else str(block_b)
        times = f"{ms:>9.2f}{ms / cudnn:>9.2f}{forward_ms:>9.2f}{ms - forward_ms:>9.2f}"
        print(f"{name:<36}{tile:>8}{warps:>7}{times}{note}", flush=True)
        release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--members", type=int, default=16, help="trials per pack")
    parser.add_argument("--shapes", default="all", choices=["all", "copying", "mnist", "none"])
    parser.add_argument(
        "--triton-sweep", action="store_true", help="time Triton configurations (pixel MNIST)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one round; runs on a CPU too"
    )
    parser.add_argument("--no-split", action="store_true", help="skip the hidden-split kernels")
    for feature in FEATURES:
        parser.add_argument(
            f"--no-{feature}",
            action="store_true",
            help=f"skip the split kernels' {feature} variants",
        )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: nothing to measure (benchmarks/lstm_step.py covers the CPU)")
        return
    device = torch.device("cuda" if cuda else "cpu")
    if args.no_split:  # the study's own steps (STEP rows) too, which would pick split kernels
        os.environ[triton_lstm.ENV_KERNEL] = "rows"
    skipped = {feature for feature in FEATURES if getattr(args, f"no_{feature}")}
    variants = variant_paths(not args.no_split, skipped)
    torch.manual_seed(0)
    random.seed(0)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'} | torch {torch.__version__}")
    for name, seq_len, batch, hidden, classes, readout in SHAPES:
        if args.shapes != "all" and args.shapes not in name.lower():
            continue
        if args.smoke:
            seq_len, batch, hidden = 12, 4, 8
        started = time.perf_counter()
        rounds = 1 if args.smoke else args.rounds
        shape = (seq_len, batch, hidden, classes, readout)
        rows = dict(
            measure_shape(shape, rounds, args.members, device, not args.no_split, variants)
        )
        cudnn = rows["nn.LSTM (cuDNN), no detach"]
        cudnn_step = rows["STEP nn.LSTM + clip + Adam, eager"]
        print(f"\n{name}: T={seq_len}, B={batch}, H={hidden}; median ms per step")
        print(f"{'implementation':<64}{'ms':>9}{'/ cuDNN':>9}{'/ cuDNN STEP':>14}")
        for label, ms in rows.items():
            print(f"{label:<64}{ms:>9.2f}{ms / cudnn:>9.2f}{ms / cudnn_step:>14.2f}")
        for verdict in target_verdicts(rows, args.members):
            print(verdict)
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.triton_sweep:
        rounds = 1 if args.smoke else args.rounds
        triton_sweep(rounds, device, not args.no_split, variants, args.smoke)
    if args.shapes == "none":
        return
    print(
        "\nRows without STEP: forward + loss + backward. STEP rows: the whole training step "
        "(+ clipping and Adam; the study step also makes the batch on the host and copies it in)."
        "\nnn.LSTM (cuDNN) uses TF32 by default (torch.backends.cudnn.allow_tf32). Triton "
        "fp32-ieee is full fp32, forced (the study's fp32 trials run it in the split kernels "
        "where they fit, else the per-step path); Triton tf32 uses TF32 in the kernels and "
        "GEMMs, which trials with precision: tf32 select."
        "\nTargets (issue 5), checked under each shape: h-detach <= 1.5 x cuDNN (forward + "
        "backward, and the whole training step); packed per trial <= 0.5 x cuDNN STEP."
    )


if __name__ == "__main__":
    main()
