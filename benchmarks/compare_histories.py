"""Compare the trial runs of one study in two MLflow stores: same trials, same params (the newer
store may add params, e.g. a new field's default), metric histories equal bit for bit.

    python benchmarks/compare_histories.py OLD/mlflow.db NEW/mlflow.db [--study quick]

Used to show that a change altered no curve: run the same study at two commits, compare.
"""

from __future__ import annotations

import argparse
import sys

from mlflow import MlflowClient


def histories(database: str, study: str) -> dict[str, dict]:
    """trial id -> {"params": ..., metric key: [(step, value), ...]} for every trial run."""
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        sys.exit(f"{database}: no study {study!r}")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`study.kind` = 'trial'"
    )
    trials = {}
    for run in runs:
        record: dict = {"params": dict(run.data.params)}
        for key in run.data.metrics:
            points = client.get_metric_history(run.info.run_id, key)
            record[key] = [(m.step, m.value) for m in sorted(points, key=lambda m: m.step)]
        trials[run.data.tags["study.trial_id"]] = record
    return trials


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--study", default="quick")
    args = parser.parse_args()
    old, new = histories(args.old, args.study), histories(args.new, args.study)
    if old.keys() != new.keys():
        print(f"different trials: {sorted(old)} vs {sorted(new)}")
        return 1
    points, differ = 0, []
    for trial_id in sorted(old):
        before, after = old[trial_id], new[trial_id]
        changed = [k for k, v in before["params"].items() if after["params"].get(k) != v]
        added = sorted(set(after["params"]) - set(before["params"]))
        keys = sorted(k for k in before if k != "params")
        unequal = [k for k in keys if before[k] != after.get(k)]
        points += sum(len(before[k]) for k in keys)
        if changed or unequal:
            differ.append(trial_id)
        metrics = f"differ: {', '.join(unequal)}" if unequal else "identical"
        print(f"{trial_id}: params changed {changed or 'none'}, added {added or 'none'}; "
              f"metrics {metrics}")  # fmt: skip
    print(f"{len(old)} trials, {points} metric points: "
          f"{'bit-identical' if not differ else 'DIFFERENT in ' + ', '.join(differ)}")  # fmt: skip
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
