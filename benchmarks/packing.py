"""Study throughput, trials per hour: K trials packed in one process vs the same trials unpacked.

Run from the repository root: `PYTHONPATH=. python benchmarks/packing.py` (torch only). On a CPU
the arms are: 2 processes x 1 thread with one trial each; 1 process x 2 threads training a pack
of 2; 2 processes x 1 thread training a pack of 2 each; and, for reference, 1 process x 2
threads training 2 trials in turn. On a GPU: trials one after another (each the graphed solo
step) against one pack of --members trials. Arms alternate within each round, every number comes
from this run, and the table gives each arm's median and best round. A trial is copying T=100
(H=128, B=100) cut to --iterations steps and one evaluation. On a GPU, one untimed round first
compiles the Triton kernels and warms cuBLAS (as the first trial of a study's worker process
does once; later ones load Triton's on-disk cache), and each pack is compared with one trial at
a time at its own precision.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from study.config import TrialConfig
from study.packed_train import train_packed
from study.train import train


def trial_configs(
    count: int, args: argparse.Namespace, device: str, precision: str = "fp32"
) -> list[TrialConfig]:
    """Distinct trials of one study: seeds, learning rates and detach probabilities vary."""
    options = {"T": 100, "val_size": args.val_size}
    return [
        TrialConfig(
            task="copying",
            task_options=options,
            method="h_detach",
            p_detach=(0.25, 0.5)[k % 2],
            lr=(1e-3, 5e-4)[(k // 2) % 2],
            seed=k,
            iterations=args.iterations,
            eval_every=args.iterations,
            device=device,
            precision=precision,
        )
        for k in range(count)
    ]


def worker(args: argparse.Namespace) -> None:
    """One CPU process of an arm: set threads, say ready, wait for go, train, print seconds."""
    torch.set_num_threads(args.threads)
    configs = trial_configs(args.first + args.count, args, "cpu")[args.first :]
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    if args.worker == "packed":
        train_packed(configs)
    else:
        for config in configs:
            train(config)
    print(f"{time.perf_counter() - started:.6f}", flush=True)


def run_arm(args: argparse.Namespace, workers: list[list[str]]) -> float:
    """Start the worker processes, release them together, return the wall seconds to the end."""
    base = [sys.executable, __file__, "--iterations", str(args.iterations)]
    base += ["--val-size", str(args.val_size)]
    procs = [
        subprocess.Popen(base + w, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for w in workers
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker failed: {proc.args}")
    return time.perf_counter() - started


def cpu_arms(args: argparse.Namespace) -> dict[str, tuple[int, float]]:
    """Arm name -> (trials, wall seconds) for each CPU arm, one round."""
    solo = [
        ["--worker", "solo", "--threads", "1", "--first", str(k), "--count", "1"] for k in (0, 1)
    ]
    packed = [["--worker", "packed", "--threads", "2", "--first", "0", "--count", "2"]]
    packs = [["--worker", "packed", "--threads", "1", "--first", "0", "--count", "2"]]
    packs.append(["--worker", "packed", "--threads", "1", "--first", "2", "--count", "2"])
    serial = [["--worker", "solo", "--threads", "2", "--first", "0", "--count", "2"]]
    return {
        "2 processes x 1 thread, 1 trial each": (2, run_arm(args, solo)),
        "1 process x 2 threads, pack of 2": (2, run_arm(args, packed)),
        "2 processes x 1 thread, pack of 2 each": (4, run_arm(args, packs)),
        "1 process x 2 threads, 2 trials in turn": (2, run_arm(args, serial)),
    }


def gpu_arms(args: argparse.Namespace) -> dict[str, tuple[int, float]]:
    """Arm name -> (trials, wall seconds) on the GPU, one round, at both trial precisions."""
    arms = {}
    for precision in ("fp32", "tf32"):
        configs = trial_configs(args.members, args, "cuda", precision)
        started = time.perf_counter()
        for config in configs[: args.solo_trials]:
            train(config)
        solo = time.perf_counter() - started
        started = time.perf_counter()
        train_packed(configs)
        packed = time.perf_counter() - started
        arms[f"1 trial at a time, {precision}"] = (args.solo_trials, solo)
        arms[f"pack of {args.members}, {precision}"] = (args.members, packed)
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=40, help="training steps per trial")
    parser.add_argument("--val-size", type=int, default=1000, help="validation sequences")
    parser.add_argument("--members", type=int, default=16, help="GPU: trials per pack")
    parser.add_argument("--solo-trials", type=int, default=2, help="GPU: unpacked trials timed")
    parser.add_argument("--worker", choices=["solo", "packed"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} | torch {torch.__version__}")
    print(f"trial: copying T=100, H=128, B=100, {args.iterations} steps + 1 evaluation")
    if cuda:  # the untimed warm-up round
        gpu_arms(args)
    samples: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        arms = gpu_arms(args) if cuda else cpu_arms(args)
        for name, (trials, seconds) in arms.items():
            samples.setdefault(name, []).append(trials / seconds * 3600)
    # The best round of each arm is its speed with the least interference from other load (a
    # shared machine slows multi-threaded arms most); the median is what a round typically got.
    # "x base": against the first arm (CPU), or one trial at a time at the same precision (GPU).
    names = list(samples)

    def base(name: str) -> list[float]:
        precision = name.rsplit(", ", 1)[-1]
        return samples[f"1 trial at a time, {precision}" if cuda else names[0]]

    print(f"{'arm (trials/hour)':<44}{'median':>8}{'x base':>8}{'best':>8}{'x base':>8}  rounds")
    for name in names:
        median, best = statistics.median(samples[name]), max(samples[name])
        ratios = median / statistics.median(base(name)), best / max(base(name))
        rounds = " ".join(f"{s:.0f}" for s in samples[name])
        print(f"{name:<44}{median:>8.0f}{ratios[0]:>8.2f}{best:>8.0f}{ratios[1]:>8.2f}  {rounds}")


if __name__ == "__main__":
    main()
