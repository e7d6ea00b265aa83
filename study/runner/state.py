"""The study's own record (DIR/ray/NAME/study.json): what `study resume` needs, and the context
every trial of the study carries into Ray."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from study import tracking
from study.errors import ConfigError, absolute, one_line
from study.space import Plan
from study.spec import StudySpec, spec_from_mapping
from study.tracking import StudyContext
from study.tracking.stores import STATE_FILE, check_own_store
from study.tracking.tags import IMPORTED_TAG

# Each Ray trial's latest state, one file per trial in DIR/ray/NAME/TRIAL_STATES, replaced at
# every evaluation. Not Tune checkpoints: after a killed driver, Tune's experiment snapshot (taken
# every 10 s or more) can name a checkpoint its rotation has already deleted, and the trial then
# cannot be resumed at all. Tune restarts unfinished trials; they continue from this file.
TRIAL_STATES = "trial_states"


@dataclass(frozen=True)
class StudyState:
    """What `study resume` needs: written before the first trial starts."""

    spec: StudySpec
    output: Path  # absolute
    tracking_uri: str
    parent_run_id: str

    @property
    def ray_dir(self) -> Path:
        return self.output / "ray"

    @property
    def experiment_dir(self) -> Path:
        return self.ray_dir / self.spec.name

    @property
    def own_store(self) -> bool:
        """Whether the study logs to its folder's DIR/mlflow.db (not a --tracking-uri store)."""
        return self.tracking_uri == tracking.store_uri(self.output)

    def context(self, plan: Plan) -> StudyContext:
        """What every trial needs besides its config: where and under which parent to log."""
        spec = self.spec
        return StudyContext(
            name=spec.name,
            tracking_uri=self.tracking_uri,
            parent_run_id=self.parent_run_id,
            roles=plan.roles,
            metric=spec.search.metric,
            mode=spec.search.mode,
            cpus=spec.resources.cpus,
            task_options=spec.task_option_names,
            trial_states=str(self.experiment_dir / TRIAL_STATES),
        )

    def save(self) -> None:
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "name": self.spec.name,
            "source": self.spec.source,
            "smoke": self.spec.smoke,
            "spec": self.spec.raw,  # --set overrides applied; they are kept for the record
            "overrides": [list(pair) for pair in self.spec.overrides],
            "base_iterations": self.spec.base_iterations,
            "tracking_uri": self.tracking_uri,
            # The store is the folder's own DIR/mlflow.db: MLflow keeps its absolute path and
            # those of the artifacts, so the folder cannot move (load() checks).
            "own_store": self.own_store,
            "parent_run_id": self.parent_run_id,
        }
        (self.experiment_dir / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, output: Path, name: str) -> StudyState:
        path = absolute(output) / "ray" / name / STATE_FILE
        if not path.is_file():
            states = (absolute(output) / "ray").glob(f"*/{STATE_FILE}")
            known = sorted(state.parent.name for state in states)
            found = f"; studies there: {', '.join(known)}" if known else ""
            if _imported(absolute(output), name):
                raise ConfigError(
                    f"study {name} in {output} was made by `study import`: it has no Ray state "
                    "for `study resume`; train its pending trials with its `study trial "
                    "--space` commands (`study plan SPACE --commands`), then `study import` "
                    "their folder"
                )
            raise ConfigError(f"no study {name!r} in {output} (no {path}){found}")
        try:
            record = json.loads(path.read_text())
            spec = spec_from_mapping(record["spec"], name=record["name"], where=record["source"])
            overrides = tuple((key, value) for key, value in record.get("overrides", []))
            spec = replace(
                spec,
                smoke=record["smoke"],
                overrides=overrides,
                base_iterations=record.get("base_iterations", spec.base_iterations),
            )
            state = cls(
                spec=spec,
                output=absolute(output),
                tracking_uri=record["tracking_uri"],
                parent_run_id=record["parent_run_id"],
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            reason = one_line(error)
            raise ConfigError(f"{path}: not a readable study record ({reason})") from None
        # Moved, or copied: resuming would log to the store it names, in the old folder.
        check_own_store(output, name, "resume")
        return state


def _imported(output: Path, name: str) -> bool:
    """Whether the folder's own store holds study `name` as `study import` made it."""
    if not tracking.has_store(output):
        return False
    try:
        parent = tracking.open_store(tracking.store_uri(output)).find_parent(name)
    except tracking.StoreError:
        return False
    return parent is not None and parent.tags.get(IMPORTED_TAG) == "true"


def recorded_store(experiment_dir: Path) -> str | None:
    """The store an earlier run's study.json names, if it can be read."""
    try:
        return json.loads((experiment_dir / STATE_FILE).read_text())["tracking_uri"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
