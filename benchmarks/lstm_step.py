"""ms per training step (forward + loss + backward): authors' loop vs nn.LSTM vs DetachLSTM.

Usage: python benchmarks/lstm_step.py [--device cpu|cuda] [--threads 2] [--rounds 7]
Needs torch alone. Implementations are timed interleaved, round after round, so machine noise
hits them alike; medians and ratios are printed from that one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from study.models import DetachLSTM

SHAPES = {
    "copying (T=120, B=100, H=128)": (120, 100, 128),
    "pixel MNIST (T=784, B=100, H=100)": (784, 100, 100),
}
P_DETACH = 0.25


def authors_loop_step(
    lstm: DetachLSTM, x: torch.Tensor, detach: list[bool], last_only: bool
) -> torch.Tensor:
    """The authors' style: a Python loop over LSTM cells, `h.detach()` when the draw says so."""
    steps, batch, _ = x.shape
    h = x.new_zeros(batch, lstm.hidden_size)
    c = x.new_zeros(batch, lstm.hidden_size)
    outputs = []
    for t in range(steps):
        h_in = h.detach() if detach[t] else h
        gates = torch.addmm(lstm.bias_ih_l0, x[t], lstm.weight_ih_l0.t()) + torch.addmm(
            lstm.bias_hh_l0, h_in, lstm.weight_hh_l0.t()
        )
        i, f, g, o = gates.chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outputs.append(h)
    return h if last_only else torch.stack(outputs)


def make_steps(shape: tuple[int, int, int], device: torch.device) -> dict[str, Callable[[], None]]:
    steps, batch, hidden = shape
    last_only = steps > 200  # pixel MNIST reads the last step; copying every step
    x = torch.rand(steps, batch, 1, device=device)
    reference = nn.LSTM(1, hidden).to(device)
    ours = DetachLSTM(1, hidden).to(device)
    ours.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(0)

    def loss_of(output: torch.Tensor, h_n: torch.Tensor) -> torch.Tensor:
        return (h_n if last_only else output).square().mean()

    def cudnn() -> None:
        output, (h_n, _) = reference(x)
        loss_of(output, h_n[0]).backward()

    def detach_lstm() -> None:
        mask = torch.rand(steps, generator=generator) < P_DETACH
        output, (h_n, _) = ours(x, detach_h=mask)
        loss_of(output, h_n[0]).backward()

    def loop() -> None:
        detach = (torch.rand(steps, generator=generator) < P_DETACH).tolist()
        result = authors_loop_step(ours, x, detach, last_only)
        (result.square().mean()).backward()

    return {
        "authors' loop (h.detach)": loop,
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
