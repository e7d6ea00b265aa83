"""ms per training step on CUDA: h-detach eager and graphed vs cuDNN nn.LSTM and the authors' loop.

Run from the repository root: `PYTHONPATH=. python benchmarks/lstm_step_cuda.py`. Needs torch only
(no Ray, MLflow or data sets: inputs are random, shaped as the paper's tasks). Every number comes
from this one run, so the ratios compare like with like. Medians over rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from study.config import TrialConfig
from study.models import SequenceClassifier
from study.models.cuda_graph import GraphedStep
from study.packed_train import _Pack
from study.tasks.base import Task
from study.train import _Trial

# (name, T, B, H, classes, readout): the copying task at T=100 and pixel MNIST (paper Sec. 5).
SHAPES = [
    ("copying T=100", 120, 100, 128, 9, "all"),
    ("pixel MNIST", 784, 100, 100, 10, "last"),
]
P_DETACH = 0.25


class RandomTask(Task):
    """Random inputs and labels with a real task's shapes (batches made on the host, as real)."""

    name = "random"
    input_size = 1
    eval_splits = ("val",)
    default_target = 1.0

    def __init__(self, seq_len: int, num_classes: int, readout: str) -> None:
        self.seq_len, self.readout = seq_len, readout
        self.num_classes = num_classes  # type: ignore[misc]

    def train_batch(self, iteration: int, batch_size: int, seed: int) -> tuple:
        generator = torch.Generator().manual_seed(seed + iteration)
        x = torch.rand(self.seq_len, batch_size, 1, generator=generator)
        shape = (self.seq_len, batch_size) if self.readout == "all" else (batch_size,)
        return x, torch.randint(0, self.num_classes, shape, generator=generator)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple]:
        yield self.train_batch(0, batch_size, 0)

    def loss_and_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple:
        logits = logits[-1] if self.readout == "last" else logits.reshape(-1, self.num_classes)
        return F.cross_entropy(logits, targets.reshape(-1)), 0, 1


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
    shape: tuple[int, int, int, int, str], members: int, device: torch.device
) -> Callable[[], None]:
    """The study's whole training step (host batch, copy, forward, loss, backward, clip, Adam)."""
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
        )
        for k in range(members)
    ]
    pack = _Pack([_Trial(config, device, task) for config in configs], device)
    counter = iter(range(10**9))
    return lambda: pack.step(next(counter))


def measure_shape(
    shape: tuple[int, int, int, int, str], rounds: int, members: int, device: torch.device
) -> list[tuple[str, float]]:
    """(implementation, median ms per step) rows for one task shape."""
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
    model = SequenceClassifier(1, hidden, classes).to(device)
    mask = (torch.rand(seq_len) < P_DETACH).to(device)
    eager = forward_backward(model, lambda: model(x, mask, readout=readout))
    rows.append(("DetachLSTM p=0.25, eager", time_steps(eager, steps, rounds)))
    graphed = GraphedStep(eager, [], device)
    rows.append(("DetachLSTM p=0.25, CUDA graph", time_steps(graphed, steps, rounds)))

    optimizer = torch.optim.Adam(cudnn.parameters(), lr=1e-3)

    def cudnn_train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(cudnn_forward(), y, readout).backward()
        torch.nn.utils.clip_grad_norm_(cudnn.parameters(), 1.0)
        optimizer.step()

    rows.append(("STEP nn.LSTM + clip + Adam, eager", time_steps(cudnn_train_step, steps, rounds)))
    task_shape = (seq_len, batch, hidden, classes, readout)
    solo = time_steps(pack_step(task_shape, 1, device), steps, rounds)
    rows.append(("STEP h-detach trial (study step, graphed)", solo))
    packed = time_steps(pack_step(task_shape, members, device), steps, rounds)
    rows.append((f"STEP {members} packed h-detach trials, per trial", packed / members))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--members", type=int, default=16, help="trials per pack")
    parser.add_argument("--shapes", default="all", choices=["all", "copying", "mnist"])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one round; runs on a CPU too"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: nothing to measure (benchmarks/lstm_step.py covers the CPU)")
        return
    device = torch.device("cuda" if cuda else "cpu")
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
        rows = dict(measure_shape(shape, rounds, args.members, device))
        cudnn = rows["nn.LSTM (cuDNN), no detach"]
        cudnn_step = rows["STEP nn.LSTM + clip + Adam, eager"]
        print(f"\n{name}: T={seq_len}, B={batch}, H={hidden}; median ms per step")
        print(f"{'implementation':<48}{'ms':>9}{'/ cuDNN':>9}{'/ cuDNN STEP':>14}")
        for label, ms in rows.items():
            print(f"{label:<48}{ms:>9.2f}{ms / cudnn:>9.2f}{ms / cudnn_step:>14.2f}")
        print(f"({time.perf_counter() - started:.0f} s)")
    print(
        "\nRows without STEP: forward + loss + backward. STEP rows: the whole training step "
        "(+ clipping and Adam; the study step also makes the batch on the host and copies it in)."
        "\nTargets (issue 5): DetachLSTM graphed <= 1.5 x cuDNN; packed per trial <= 0.5 x "
        "cuDNN STEP."
    )


if __name__ == "__main__":
    main()
