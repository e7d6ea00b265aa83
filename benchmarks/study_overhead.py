"""Ray + MLflow bookkeeping per trial: studies of trials that do (almost) no training.

Runs two studies of N1 and N2 one-iteration trials on one Ray (started once, outside the timing)
with the embedded MLflow store, and prints the per-trial cost as the slope between them, so
start-up and end-of-study work cancel out (each study is timed twice, the faster run kept, as
a new worker process per study makes the fixed part noisy). Trials run one at a time
(max_concurrent 1), so the figure is the bookkeeping of one trial, not divided by parallelism.

    .venv/bin/python benchmarks/study_overhead.py [--small 2] [--large 42]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
import yaml

from study.config import TrialConfig
from study.runner import run_study
from study.space import plan_trials
from study.spec import load_spec
from study.train import train


def space(folder: Path, name: str, seeds: int) -> Path:
    """A copying study whose trials train one iteration on a 4-unit LSTM."""
    spec = {
        "task": {"name": "copying", "T": 1, "train_size": 10, "val_size": 10},
        "model": {"hidden_size": 4},
        "fixed": {"iterations": 1, "eval_every": 1, "batch_size": 1},
        "scientific": {"method": ["none"]},
        "replicates": {"seeds": seeds},
        "resources": {"cpus": 1, "max_concurrent": 1},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def timed_study(folder: Path, name: str, trials: int) -> float:
    spec = load_spec(space(folder, name, trials))
    started = time.perf_counter()
    code = run_study(spec, folder / name, echo=lambda line: None)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"study {name} ended with status {code}")
    return seconds


def _timed_train(config: TrialConfig) -> float:
    started = time.perf_counter()
    train(config)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2)
    parser.add_argument("--large", type=int, default=42)
    args = parser.parse_args()

    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        with tempfile.TemporaryDirectory() as temp:
            folder = Path(temp)
            timed_study(folder, "warmup", 1)  # worker processes and imports, excluded
            small = min(timed_study(folder, f"small{k}", args.small) for k in range(2))
            large = min(timed_study(folder, f"large{k}", args.large) for k in range(2))
            trial = plan_trials(load_spec(space(folder, "bare", 1)))[0].config
            bare = min(_timed_train(trial) for _ in range(3))  # warm, as in a reused worker
    finally:
        ray.shutdown()
    per_trial = (large - small) / (args.large - args.small)
    print(f"study of {args.small:>3} trials: {small:6.2f} s")
    print(f"study of {args.large:>3} trials: {large:6.2f} s")
    print(f"train() alone, one such trial: {bare:.3f} s")
    print(
        f"bookkeeping per trial (Ray + MLflow, after start-up): {per_trial - bare:.2f} s "
        f"(slope {per_trial:.2f} s/trial minus training)"
    )


if __name__ == "__main__":
    main()
