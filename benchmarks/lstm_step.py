"""ms per training step (forward + loss + backward): authors' loop vs nn.LSTM vs DetachLSTM.

Usage: python benchmarks/lstm_step.py [--device cpu|cuda] [--threads 2] [--rounds 7]
Needs torch alone. Implementations are timed interleaved, round after round, so machine noise
hits them alike; medians and ratios are printed from that one run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from study.models import DetachLSTM
from study.models.cpu_cells import CompiledCells, cells_for

SHAPES = {
    "copying (T=120, B=100, H=128)": (120, 100, 128),
    "pixel MNIST (T=784, B=100, H=100)": (784, 100, 100),
}
P_DETACH = 0.25


class AuthorsStyleCell(nn.Module):
    """An LSTM cell written as the authors' code does: two Linear layers, gates [i, f, o | g]."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(input_size, 4 * hidden_size)
        self.h2h = nn.Linear(hidden_size, 4 * hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple:
        preact = self.i2h(x) + self.h2h(h)
        hidden = self.hidden_size
        gates = preact[:, : 3 * hidden].sigmoid()
        g = preact[:, 3 * hidden :].tanh()
        i, f, o = gates[:, :hidden], gates[:, hidden : 2 * hidden], gates[:, 2 * hidden :]
        c = c * f + i * g
        return o * c.tanh(), c


def make_steps(shape: tuple[int, int, int], device: torch.device) -> dict[str, Callable[[], None]]:
    """One training step's forward + loss + backward for each implementation, same data.

    The loss is the task's: cross-entropy on every step for copying (9 classes), on the last
    step for pixel MNIST (10 classes). The authors' loop draws and detaches in Python and applies
    the head and the loss inside the time loop, as their copying script does.
    """
    steps, batch, hidden = shape
    last_only = steps > 200
    classes = 10 if last_only else 9
    x = torch.rand(steps, batch, 1, device=device)
    targets = torch.randint(0, classes, (batch,) if last_only else (steps, batch), device=device)
    reference = nn.LSTM(1, hidden).to(device)
    ours = DetachLSTM(1, hidden).to(device)
    ours.load_state_dict(reference.state_dict())
    cell = AuthorsStyleCell(1, hidden).to(device)
    head = nn.Linear(hidden, classes).to(device)
    generator = torch.Generator().manual_seed(0)
    draws = random.Random(0)

    def loss_of(output: torch.Tensor, h_n: torch.Tensor) -> torch.Tensor:
        if last_only:
            return F.cross_entropy(head(h_n), targets)
        return F.cross_entropy(head(output).reshape(-1, classes), targets.reshape(-1))

    def cudnn() -> None:
        output, (h_n, _) = reference(x)
        loss_of(output, h_n[0]).backward()

    def detach_lstm() -> None:
        mask = torch.rand(steps, generator=generator) < P_DETACH
        output, (h_n, _) = ours(x, detach_h=mask)
        loss_of(output, h_n[0]).backward()

    def authors_loop() -> None:
        h = x.new_zeros(batch, hidden)
        c = x.new_zeros(batch, hidden)
        loss = x.new_zeros(())
        for t in range(steps):
            if draws.random() <= P_DETACH:
                h = h.detach()
            h, c = cell(x[t], h, c)
            if not last_only:
                loss = loss + F.cross_entropy(head(h), targets[t])
        loss = F.cross_entropy(head(h), targets) if last_only else loss / steps
        loss.backward()

    return {
        "authors' loop (h.detach)": authors_loop,
        "nn.LSTM": cudnn,
        f"DetachLSTM p={P_DETACH}": detach_lstm,
    }


def time_interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, device: torch.device
) -> dict[str, float]:
    """Median ms per call; each round runs every implementation once, in turn."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():  # warm-up: allocator, oneDNN/cuDNN plans
        fn()
        fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    if device.type == "cpu":
        cells = cells_for(torch.zeros(1))
        kind = "compiled lstm_cells.c" if isinstance(cells, CompiledCells) else "torch ops"
        print(f"DetachLSTM's CPU cells: {kind} (HDETACH_CPU_CELLS=torch for the fallback)")
    for label, shape in SHAPES.items():
        medians = time_interleaved(make_steps(shape, device), args.rounds, device)
        base = medians["nn.LSTM"]
        ours = medians[f"DetachLSTM p={P_DETACH}"]
        loop = medians["authors' loop (h.detach)"]
        print(f"\n{label}: median ms per step over {args.rounds} rounds")
        for impl, ms in medians.items():
            print(f"  {impl:28s} {ms:9.2f} ms   {ms / base:5.2f}x nn.LSTM")
        print(
            f"  DetachLSTM / nn.LSTM = {ours / base:.2f}; "
            f"authors' loop / DetachLSTM = {loop / ours:.2f}"
        )


if __name__ == "__main__":
    main()
