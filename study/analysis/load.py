"""Read one study (parent run, child runs, validation curves) into the analysis records.

tracking.py reads the store (it alone imports mlflow) and hands back plain run records and
metric points; this module builds the records below from them. The statistics and figures work
on these records and never touch a store, so they can be tested and reused without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from study.claim_spec import Claim
from study.errors import ConfigError
from study.space import NUISANCE
from study.tracking import (
    MetricPoint,
    RunRecord,
    StoreError,
    checked_store,
    open_store,
    sqlite_path,
    trial_state,
)
from study.tracking.tags import (
    IMPORTED_TAG,
    base_iterations_from_tags,
    claims_from_tags,
    overrides_from_tags,
    variants_from_tags,
)
from study.vocabulary import COMPLETED, DIVERGED, parse_clip

# Cell axes of the robustness grid (task x method x p x lr x clip); seeds are the replicates.
CELL_PARAMS = ("task", "method", "p_detach", "lr", "clip_norm")
# Params that differ between trials by construction, never a reason to warn about pooling.
_PER_TRIAL_PARAMS = {*CELL_PARAMS, "seed"}


@dataclass
class Trial:
    """One child run: its cell, its state and its validation curve (steps = iterations)."""

    trial_id: str
    run_id: str
    # completed | diverged (both FINISHED), failed (FAILED), running (RUNNING, SCHEDULED, or
    # KILLED: interrupted, and rerun by `study resume`)
    state: str
    task: str  # task name plus its options, e.g. "copying T=300"
    method: str
    p_detach: float
    lr: float
    clip_norm: float | None  # None = no clipping
    seed: int
    budget: int  # planned training iterations
    val_steps: np.ndarray
    val_acc: np.ndarray
    # test/accuracy is logged as "test accuracy at the best validation point so far" (MNIST only),
    # so its last value is the test accuracy to report; NaN when the task has no test split.
    test_at_best: float = math.nan
    error: str = ""
    params: dict[str, str] = field(default_factory=dict)
    # An Optuna study's analysed trial: the values its search found (stats.best_tuned_trials).
    tuned_values: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in (COMPLETED, DIVERGED)

    @property
    def variant(self) -> tuple[str, float]:
        """The method as compared in the study: (method, p_detach)."""
        return (self.method, self.p_detach)

    @property
    def cell(self) -> tuple[str, str, float, float, float | None]:
        return (self.task, self.method, self.p_detach, self.lr, self.clip_norm)


@dataclass
class Study:
    """A study as MLflow holds it: the plan (parent run tags) and every trial started so far."""

    name: str
    tracking_uri: str
    parent_run_id: str
    n_planned: int
    target: float  # validation accuracy that counts as success
    trials: list[Trial]
    # Params that vary across trials although they are no cell axis (hidden_size, batch_size,
    # ...): each value makes cells of its own, named in the trials' task label ("copying T=10
    # hidden_size=16"), as a claim's cells are (claims._setting). Pooled with the seeds, they
    # were counted as seeds, and a claim and the statistics printed two intervals for one value.
    split_params: list[str] = field(default_factory=list)
    # An Optuna study's nuisance params, tuned per scientific point and seed (role.X tags): the
    # analysis compares methods at each seed's best tuned trial (stats.best_tuned_trials).
    tuned: list[str] = field(default_factory=list)
    # The space's claims (parent tag study.claims), its `--set` overrides, and the iterations of
    # the file without them: the budget a claim's verdict is quoted against.
    claims: tuple[Claim, ...] = ()
    overrides: tuple[tuple[str, object], ...] = ()
    base_iterations: int | None = None
    # The (method, p_detach) pairs of the plan (parent tag study.variants; none for Optuna):
    # a method whose trials have not started is still named by the report.
    planned_variants: tuple[tuple[str, float], ...] = ()
    # Made by `study import` from result files: its pending trials train by `study trial
    # --space`, there is no Ray state for `study resume`.
    imported: bool = False

    @property
    def n_pending(self) -> int:
        return max(self.n_planned - len(self.trials), 0)


def load_study(name: str, tracking_uri: str) -> Study:
    """Read study `name` from the store at `tracking_uri`; ConfigError when it is not there."""
    label = f"study {name!r} at tracking URI"  # check_uri's messages add the URI themselves
    where = f"{label} {tracking_uri}"
    tracking_uri = _check_store(tracking_uri, label, where)
    tracker = open_store(tracking_uri)
    try:
        experiment_id = tracker.experiment_id(name)
    except StoreError as error:
        raise ConfigError(f"{where}: cannot read the store ({error})") from None
    if experiment_id is None:
        raise ConfigError(f"{where}: no such experiment (run `study run` first?)")

    # One parent per study by contract; if a study was restarted from scratch, the newest wins.
    parent = tracker.newest_parent(experiment_id)
    if parent is None:
        raise ConfigError(f"{where}: the experiment has no parent run tagged study.kind=parent")
    tags = parent.tags
    try:
        n_planned = int(tags["study.n_trials"])
        target = float(tags["study.target"])
    except (KeyError, ValueError):
        raise ConfigError(
            f"{where}: parent run lacks a valid study.n_trials or study.target tag"
        ) from None

    children = tracker.trials(parent)
    trials = sorted(
        (
            _trial(
                run,
                tracker.history(run.run_id, "val/accuracy"),
                tracker.history(run.run_id, "test/accuracy"),
            )
            for run in children
        ),
        key=lambda t: t.trial_id,
    )
    tuned = set()
    if tags.get("study.searcher") == "optuna":
        for run in children:
            for key, role in run.tags.items():
                if key.startswith("role.") and role == NUISANCE:
                    tuned.add(key.removeprefix("role."))
    split = [key for key in _varying_params(trials) if key not in tuned]
    if split:
        trials = [replace(trial, task=_split_label(trial, split)) for trial in trials]
    return Study(
        name=name,
        tracking_uri=tracking_uri,
        parent_run_id=parent.run_id,
        n_planned=n_planned,
        target=target,
        trials=trials,
        split_params=split,
        tuned=sorted(tuned),
        claims=claims_from_tags(tags),
        overrides=overrides_from_tags(tags),
        base_iterations=base_iterations_from_tags(tags),
        planned_variants=variants_from_tags(tags),
        imported=tags.get(IMPORTED_TAG) == "true",
    )


def _check_store(tracking_uri: str, label: str, where: str) -> str:
    """The URI to read (tracking.check_uri), once it is known to name a store MLflow opens."""
    tracking_uri, exists = checked_store(tracking_uri, label)
    if not exists:  # opening a missing SQLite file would silently create an empty store
        raise ConfigError(f"{where}: no MLflow database at {sqlite_path(tracking_uri)}")
    return tracking_uri


def _trial(run: RunRecord, val_acc: list[MetricPoint], test_acc: list[MetricPoint]) -> Trial:
    params, tags = run.params, run.tags
    steps, val_values = curve_of(val_acc)
    _, test_values = curve_of(test_acc)
    clip = params.get("clip_norm", "none")
    return Trial(
        trial_id=tags.get("study.trial_id", run.run_id),
        run_id=run.run_id,
        state=trial_state(run.status, tags),
        task=_task_label(params),
        method=params.get("method", tags.get("method", "none")),
        p_detach=float(params.get("p_detach", 0.0)),
        lr=float(params["lr"]),
        clip_norm=parse_clip(clip or None),
        seed=int(params.get("seed", tags.get("seed", 0))),
        budget=int(params["iterations"]),
        val_steps=steps,
        val_acc=val_values,
        test_at_best=float(test_values[-1]) if len(test_values) else math.nan,
        error=tags.get("error", "killed" if run.status == "KILLED" else ""),
        params=dict(params),
    )


def _task_label(params: dict[str, str]) -> str:
    """`copying` + flattened task_options.* params -> "copying T=300"."""
    options = sorted(
        (key.removeprefix("task_options."), value)
        for key, value in params.items()
        if key.startswith("task_options.")
    )
    return " ".join([params.get("task", "?"), *(f"{key}={value}" for key, value in options)])


def curve_of(points: list[MetricPoint]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) sorted by step; a step logged twice (retried trial) keeps the last value."""
    by_step: dict[int, tuple[int, float]] = {}
    for point in points:
        old = by_step.get(point.step)
        if old is None or point.timestamp >= old[0]:
            by_step[point.step] = (point.timestamp, point.value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    values = np.array([by_step[int(step)][1] for step in steps], dtype=np.float64)
    return steps, values


def _split_label(trial: Trial, keys: list[str]) -> str:
    """The task label with the trial's value of each split param: "copying T=10 hidden_size=16"."""
    return " ".join([trial.task, *(f"{key}={trial.params.get(key)}" for key in keys)])


def _varying_params(trials: list[Trial]) -> list[str]:
    varying = set()
    for key in {key for trial in trials for key in trial.params}:
        if key in _PER_TRIAL_PARAMS or key.startswith("task_options."):
            continue
        if len({trial.params.get(key) for trial in trials}) > 1:
            varying.add(key)
    return sorted(varying)
