"""Tune assembly: the Tuner of a grid or random study (a Ray trial per trial or per pack), one per
Optuna cell, each restored from its Ray state on resume; trial names, domains, resources."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from study import space
from study.config import INT_FIELDS
from study.runner.preflight import gpus_per_trial
from study.runner.progress import ConsoleProgress, ProgressCallback
from study.runner.state import StudyState
from study.runner.trainable import run_ray_trial
from study.space import Cell, Plan, PlannedTrial
from study.spec import Range
from study.tracking import StudyContext


@dataclass(frozen=True)
class Tuners:
    """Builds the Tuners of one session of a study, every one printing through `progress`."""

    state: StudyState
    plan: Plan
    context: StudyContext
    max_concurrent: int | None
    progress: ConsoleProgress

    def grid(self, done: set[str], resuming: bool) -> tune.Tuner | None:
        """The one Tuner of a grid or random study; None when no trial is left to run."""
        trainable = self._trainable()
        if resuming and _restorable(self.state.experiment_dir):
            return self._restored(self.state.experiment_dir, trainable)
        # No Tune state yet (the driver died at once): start over with the trials MLflow does
        # not hold as completed or diverged (failed ones are retried, as Tune's restore does).
        axis, points = _grid_points(self.plan, done)
        if not points:
            return None
        return tune.Tuner(
            trainable,
            param_space={"study": self.context.to_dict(), axis: tune.grid_search(points)},
            tune_config=self._tune_config(TrialNamer()),
            run_config=self._run_config(self.state.spec.name, self.state.ray_dir),
        )

    def cell(self, cell: Cell, started_ids: set[str]) -> tune.Tuner | None:
        """One scientific x replicate cell: Optuna tunes the nuisance axes over n_samples trials.
        None when the cell cannot continue (started, but without Ray state to resume)."""
        spec = self.state.spec
        trainable = self._trainable()
        name = cell_name(cell)
        folder = self.state.experiment_dir / name
        if _restorable(folder):
            return self._restored(folder, trainable)
        if set(cell.trial_ids()) & started_ids:
            # Without Tune's state, Optuna would sample the cell afresh under ids already used.
            return None
        base = space.cell_config(spec, cell, {})
        # Each cell its own sampler seed, wrapped into the [0, 2^32) Optuna's samplers take.
        seed = (spec.search.seed + cell.index) % 2**32
        searcher = OptunaSearch(metric=spec.search.metric, mode=spec.search.mode, seed=seed)
        point = {**cell.point, "seed": cell.seed}
        return tune.Tuner(
            trainable,
            param_space={
                "study": self.context.to_dict(),
                "trial": {"config": base.to_dict(), "point": point},
                "nuisance": {p: _domain(p, axis) for p, axis in cell.domains.items()},
            },
            tune_config=self._tune_config(
                TrialNamer(cell.first_trial),
                search_alg=searcher if cell.domains else None,
                num_samples=cell.n_samples,
            ),
            run_config=self._run_config(name, self.state.experiment_dir),
        )

    def _restored(self, folder: Path, trainable: Any) -> tune.Tuner:
        tuner = tune.Tuner.restore(str(folder), trainable, resume_errored=True)
        # Tune runs the callbacks it pickled with the experiment, which pickle without their
        # printer (ProgressCallback): this session's goes to them. Ray offers no public way to a
        # restored Tuner's RunConfig; under Ray Client there is no local one, and, as in a new
        # study there, no lines.
        local = getattr(tuner, "_local_tuner", None)
        callbacks = (local.get_run_config().callbacks or []) if local is not None else []
        for callback in callbacks:
            if isinstance(callback, ProgressCallback):
                callback.progress = self.progress
        return tuner

    def _trainable(self) -> Any:
        spec = self.state.spec
        resources = {"cpu": spec.resources.cpus, "gpu": gpus_per_trial(spec)}
        return tune.with_resources(run_ray_trial, resources)

    def _tune_config(self, namer: TrialNamer, **extra: Any) -> tune.TuneConfig:
        return tune.TuneConfig(
            max_concurrent_trials=self.max_concurrent or self.state.spec.resources.max_concurrent,
            # One worker process serves trial after trial: torch, MLflow and the task data are
            # imported once per worker, not once per trial.
            reuse_actors=True,
            trial_name_creator=namer,
            trial_dirname_creator=namer,
            **extra,
        )

    def _run_config(self, name: str, storage: Path) -> tune.RunConfig:
        return tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=self.state.spec.resources.max_failures),
            callbacks=[ProgressCallback(self.progress)],
        )


def cell_name(cell: Cell) -> str:
    """The folder of a cell's Ray state in the study's experiment folder."""
    return f"cell{cell.index:03d}"


class TrialNamer:
    """Names Ray trials by our trial ids (t0007) or pack ids (p0003), so folders, logs and MLflow
    runs agree.

    A grid trial or pack carries its id; an Optuna trial gets the cell's first id plus its sample
    number (Tune's experiment tag starts with a 1-based counter).
    """

    def __init__(self, first_trial: int | None = None) -> None:
        self.first_trial = first_trial

    def __call__(self, trial: Any) -> str:
        if self.first_trial is None:
            return trial.config["pack" if "pack" in trial.config else "trial"]["id"]
        counter = int(str(trial.experiment_tag).split("_", 1)[0])
        return space.trial_id(self.first_trial + counter - 1)


def _grid_points(plan: Plan, done: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """The Tune grid: one point per trial ("trial"), or per pack ("pack") when resources.pack > 1,
    leaving out the trials in `done`."""

    def planned(trial: PlannedTrial) -> dict[str, Any]:
        return {"id": trial.trial_id, "config": trial.config.to_dict(), "point": trial.point}

    if not plan.packed:
        return "trial", [planned(t) for t in plan.trials if t.trial_id not in done]
    packs = [
        {
            "id": pack.pack_id,
            "size": len(pack.trials),
            "members": [planned(t) for t in pack.trials if t.trial_id not in done],
        }
        for pack in plan.packs
    ]
    return "pack", [pack for pack in packs if pack["members"]]


def _restorable(folder: Path) -> bool:
    """Whether Tune saved enough to restore: tuner.pkl is written at once, but the trials live in
    the experiment-state snapshot, which a driver killed in its first moments never wrote."""
    return tune.Tuner.can_restore(str(folder)) and any(folder.glob("experiment_state-*.json"))


def _domain(param: str, axis: list[Any] | Range) -> Any:
    if isinstance(axis, list):
        return tune.choice(axis)
    if param in INT_FIELDS:
        low, high = int(axis.min), int(axis.max) + 1  # randint's upper end is exclusive
        return tune.lograndint(low, high) if axis.scaling == "log" else tune.randint(low, high)
    if axis.scaling == "log":
        return tune.loguniform(axis.min, axis.max)
    return tune.uniform(axis.min, axis.max)
