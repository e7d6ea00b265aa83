"""Runs that summarise trials rather than train them: one run per cell under a study's parent
(seed-aggregated curves, which the MLflow UI cannot draw itself) and the scorecard's own run.

Both are tagged with their own `study.kind` (cell, scorecard), so `study ls`, `resume` and the
report, which read `study.kind = trial` runs under `study.kind = parent` ones, never mix them up
with the trials."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow.entities import Metric, Param, ViewType
from mlflow.exceptions import MlflowException

from study.errors import ConfigError, one_line
from study.tracking import MetricPoint, Tracker

CELL, SCORECARD = "cell", "scorecard"
SCORECARD_EXPERIMENT = "study-scorecard"
_BATCH = 1000  # MLflow's limit of metrics per log_batch


def trial_histories(
    tracker: Tracker, run_ids: Sequence[str], key: str
) -> dict[str, list[MetricPoint]]:
    """One metric's history for each trial run."""
    return {run_id: tracker.history(run_id, key) for run_id in run_ids}


def replace_cell_runs(
    tracker: Tracker,
    parent_run_id: str,
    study_name: str,
    cells: Sequence[tuple[str, Mapping[str, str], Mapping[str, Sequence[tuple[int, float]]]]],
) -> int:
    """Write one run per cell under the parent: (name, params, {metric key: [(step, value)]}).
    A report run again replaces the earlier ones (deleted, so the UI shows the new numbers
    only). Returns the number of runs written."""
    client = tracker._mlflow  # the package's own client (study.tracking owns every MLflow call)
    try:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        for run in _cell_runs(tracker, experiment_id, parent_run_id):
            client.delete_run(run.info.run_id)
        now = int(time.time() * 1000)
        for name, params, metrics in cells:
            tags = {
                "mlflow.parentRunId": parent_run_id,
                "study.name": study_name,
                "study.kind": CELL,
                "study.cell": name,
            }
            run = client.create_run(experiment_id, run_name=name, tags=tags)
            points = [
                Metric(key, float(value), now, int(step))
                for key, series in metrics.items()
                for step, value in series
            ]
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            for start in range(0, len(points), _BATCH):
                client.log_batch(run.info.run_id, metrics=points[start : start + _BATCH])
            client.set_terminated(run.info.run_id, "FINISHED")
    except MlflowException as error:
        raise ConfigError(f"tracking URI {tracker.uri}: {one_line(error)}") from None
    return len(cells)


def _cell_runs(tracker: Tracker, experiment_id: str, parent_run_id: str) -> list:
    """The active cell runs under a parent (a study has far fewer than 5,000 cells)."""
    return tracker._mlflow.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`study.kind` = '{CELL}'"
        ),
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=5000,
    )


def log_scorecard(tracker: Tracker, folder: Path, counts: Mapping[str, int], output: Path) -> str:
    """The scorecard as its own run in its own experiment (never a study's: it has no parent
    run, so `study ls` does not list it): its files (`folder`) as artifacts, the verdict counts
    as metrics (`output`: the --output, which holds `folder`)."""
    client = tracker._mlflow
    experiment_id = tracker.ensure_experiment(SCORECARD_EXPERIMENT, output)
    try:
        run = client.create_run(
            experiment_id,
            run_name=f"scorecard {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={"study.kind": SCORECARD},
        )
        now = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(f"claims/{verdict}", n, now, 0) for verdict, n in counts.items()],
        )
        client.log_artifacts(run.info.run_id, str(folder), artifact_path="scorecard")
        client.set_terminated(run.info.run_id, "FINISHED")
    except (MlflowException, OSError) as error:
        raise ConfigError(f"tracking URI {tracker.uri}: {one_line(error)}") from None
    return run.info.run_id
