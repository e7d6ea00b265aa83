"""Ray Tune: the trainable around train(), Tuners and searchers, resume (the only ray import)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from study import console, space, tracking
from study.config import ConfigError, TrialConfig
from study.spec import Range, StudySpec, spec_from_mapping
from study.tasks import TASKS
from study.train import COMPLETED, DIVERGED, Progress, train

STATE_FILE = "study.json"  # our own record of a study, next to Ray's state in DIR/ray/NAME
CHECKPOINT_FILE = "trial.pt"
# Two, not one: if the driver dies, Tune's experiment snapshot may still name the previous one.
CHECKPOINTS_KEPT = 2
Echo = Callable[[str], None]


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

    def save(self) -> None:
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "name": self.spec.name,
            "source": self.spec.source,
            "smoke": self.spec.smoke,
            "spec": self.spec.raw,
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_run_id,
        }
        (self.experiment_dir / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, output: Path, name: str) -> StudyState:
        path = output.absolute() / "ray" / name / STATE_FILE
        if not path.is_file():
            states = (output.absolute() / "ray").glob(f"*/{STATE_FILE}")
            known = sorted(state.parent.name for state in states)
            found = f"; studies there: {', '.join(known)}" if known else ""
            raise ConfigError(f"no study {name!r} in {output} (no {path}){found}")
        record = json.loads(path.read_text())
        spec = spec_from_mapping(record["spec"], name=record["name"], where=record["source"])
        return cls(
            spec=replace(spec, smoke=record["smoke"]),
            output=output.absolute(),
            tracking_uri=record["tracking_uri"],
            parent_run_id=record["parent_run_id"],
        )


# ---------------------------------------------------------------- the trainable (trial process)


def _trainable(config: dict[str, Any]) -> None:
    """One trial: train() with every evaluation logged to MLflow and reported to Tune."""
    study = config["study"]
    # Ray reserves `cpus` cores for the trial; torch would otherwise use every core on the node.
    torch.set_num_threads(max(1, int(study["cpus"])))
    trial_id = tune.get_context().get_trial_name()
    if "nuisance" in config:
        trial_config = space.sample_config(
            config["trial"]["config"], config["nuisance"], study["task_options"]
        )
    else:
        trial_config = TrialConfig.from_dict(config["trial"]["config"])
    run = tracking.TrialRun(
        study["tracking_uri"],
        study["parent_run_id"],
        trial_id,
        trial_config,
        study["roles"],
        study["name"],
    )
    # Which Ray node ran the trial (the last attempt's, after a retry): shows a study's spread.
    run.mlflow.set_tag(run.run_id, "ray.node_id", ray.get_runtime_context().get_node_id())
    try:
        outcome = _train_and_report(trial_config, run, study["metric"])
    except Exception as error:
        run.fail(error)
        raise
    run.finish(outcome)


def _train_and_report(config: TrialConfig, run: tracking.TrialRun, metric: str) -> str:
    state, status = _restore()
    if status in (COMPLETED, DIVERGED):
        return status  # it had finished when the driver died; nothing left to train
    latest: dict[str, Any] = {}

    def report(progress: Progress) -> None:
        latest.update(progress.metrics)
        if progress.status == DIVERGED:
            latest[metric] = math.nan  # a searcher must not rank a diverged trial by old values
        run.log(progress.iteration, progress.metrics)
        with tempfile.TemporaryDirectory() as folder:
            saved = {"status": progress.status, "state": progress.checkpoint()}
            torch.save(saved, Path(folder) / CHECKPOINT_FILE)
            tune.report(
                # Tune checks that every result holds the searcher's metric.
                {
                    metric: math.nan,
                    **latest,
                    "iteration": progress.iteration,
                    "outcome": progress.status,
                },
                checkpoint=tune.Checkpoint.from_directory(folder),
            )

    return train(config, report, resume_from=state).status


def _restore() -> tuple[dict[str, Any] | None, str | None]:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None
    try:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)
    except (FileNotFoundError, OSError):
        # A stale snapshot can name a checkpoint already rotated away. Training is deterministic
        # and MLflow skips logged steps, so starting over costs time, not correctness.
        return None, None
    return saved["state"], saved["status"]


class _TrialNamer:
    """Names Ray trials by our trial ids (t0007), so folders, logs and MLflow runs agree.

    A grid trial carries its id; an Optuna trial gets the cell's first id plus its sample number
    (Tune's experiment tag starts with a 1-based counter).
    """

    def __init__(self, first_trial: int | None = None) -> None:
        self.first_trial = first_trial

    def __call__(self, trial: Any) -> str:
        if self.first_trial is None:
            return trial.config["trial"]["id"]
        counter = int(str(trial.experiment_tag).split("_", 1)[0])
        return space.trial_id(self.first_trial + counter - 1)


# ---------------------------------------------------------------- the driver


class _Reporter:
    """Prints one line per finished trial, numbered across sessions of the study."""

    def __init__(self, state: StudyState, total: int, finished: set[str], echo: Echo) -> None:
        self.state = state
        self.total = total
        self.finished = set(finished)
        self.echo = echo

    def error(self, trial: Any) -> str:
        """The error the trial recorded in MLflow itself, else the one Ray kept."""
        run = tracking.find_trial_run(
            self.state.tracking_uri, self.state.parent_run_id, str(trial)
        )
        if run is not None and run.data.tags.get("error"):
            return run.data.tags["error"]
        return _trial_error(trial)

    def line(self, trial: Any, outcome: str, error: str = "") -> None:
        name = str(trial)
        self.finished.add(name)
        result = trial.last_result or {}
        point = {**trial.config["trial"]["point"], **trial.config.get("nuisance", {})}
        best = result.get("best/val_accuracy")
        self.echo(
            console.trial_line(
                len(self.finished),
                self.total,
                name,
                point,
                outcome,
                best,
                result.get("time_total_s"),
                error,
            )
        )


# Tune pickles its callbacks with the experiment and restores *those* on resume, so the callback
# keeps no state of its own and prints through the reporter of the current session.
_reporter: _Reporter | None = None


class _ProgressCallback(tune.Callback):
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _reporter is not None:
            _reporter.line(trial, (trial.last_result or {}).get("outcome", COMPLETED))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _reporter is not None:
            _reporter.line(trial, tracking.FAILED, _reporter.error(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _reporter is not None:
            error = console.shorten(_reporter.error(trial))
            _reporter.echo(f"      {trial}: retrying after {error}")


def _trial_error(trial: Any) -> str:
    try:
        error = trial.get_pickled_error()
    except Exception:  # the error file may be unreadable; the MLflow run still has the error
        error = None
    if error is None:
        return "error (see the trial's error.txt)"
    # A RayTaskError wraps the trainable's own exception, which is the one worth a line.
    return tracking.one_line(getattr(error, "cause", None) or error)


def run_study(
    spec: StudySpec,
    output: Path,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    max_concurrent: int | None = None,
    echo: Echo = print,
) -> int:
    """Run a new study; returns the exit status: 0 when every trial finished (completed or
    diverged), 1 when some trial failed, 130 when interrupted with trials left."""
    output = output.absolute()
    output.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or tracking.store_uri(output)
    if _store_exists(uri) and tracking.find_parent(uri, spec.name) is not None:
        raise ConfigError(
            f"study {spec.name} already exists in {_store_label(uri)}; continue it with "
            f"`study resume {spec.name} --output {output}`, or run into another --output"
        )
    artifacts = None
    if tracking_uri is None:
        artifacts = (tracking.artifact_dir(output) / spec.name).as_uri()
    experiment_id = tracking.ensure_experiment(uri, spec.name, artifacts)
    parent = tracking.start_parent(
        uri, experiment_id, spec.name, _parent_tags(spec), spec.to_yaml()
    )
    state = StudyState(spec, output, uri, parent)
    state.save()
    return _execute(state, address, max_concurrent, echo, resuming=False)


def resume_study(
    name: str, output: Path, *, address: str | None = None, echo: Echo = print
) -> int:
    """Continue an interrupted study: Tune restores its trials, errored ones included."""
    state = StudyState.load(output, name)
    if tracking.find_parent(state.tracking_uri, name) is None:
        raise ConfigError(
            f"study {name}: no parent run in {_store_label(state.tracking_uri)}; was it deleted?"
        )
    tracking.reopen_run(state.tracking_uri, state.parent_run_id)
    return _execute(state, address, None, echo, resuming=True)


def _execute(
    state: StudyState, address: str | None, max_concurrent: int | None, echo: Echo, resuming: bool
) -> int:
    global _reporter
    spec = state.spec
    started = time.monotonic()
    total = space.n_trials(spec)
    before = tracking.summarize(state.tracking_uri, spec.name)
    trials = before.trials if before else []
    started_ids = {t.trial_id for t in trials}
    finished = {t.trial_id for t in trials if t.state != tracking.RUNNING}
    done = {t.trial_id for t in trials if t.state in (tracking.COMPLETED, tracking.DIVERGED)}
    verb = "resuming" if resuming else "running"
    echo(
        f"{verb} {spec.name}{' (smoke)' if spec.smoke else ''}: {total} trials "
        f"({len(finished)} finished), {spec.search.searcher} search; "
        f"MLflow {_store_label(state.tracking_uri)}, Ray state {state.experiment_dir}"
    )
    _reporter = _Reporter(state, total, finished, echo)
    try:
        with _ray_session(address, spec):
            if spec.search.searcher == "optuna":
                for cell in space.plan_cells(spec):
                    _fit_cell(state, cell, max_concurrent, started_ids, echo)
            else:
                _fit_grid(state, max_concurrent, done, resuming)
    finally:
        _reporter = None
    summary = tracking.summarize(state.tracking_uri, spec.name)
    assert summary is not None
    failed, pending = summary.count(tracking.FAILED), summary.pending
    status = "FAILED" if failed else ("KILLED" if pending else "FINISHED")
    tracking.end_run(state.tracking_uri, state.parent_run_id, status)
    echo(console.summary_table(summary))
    echo(f"took {time.monotonic() - started:.0f} s")
    if pending:
        echo(f"unfinished; continue with: study resume {spec.name} --output {state.output}")
    echo(f"MLflow UI: {console.ui_command(str(state.output), _server_uri(state.tracking_uri))}")
    if failed:
        return 1
    return 130 if pending else 0  # pending after fit: interrupted (Ctrl-C), as main() reports it


def _fit_grid(
    state: StudyState, max_concurrent: int | None, done: set[str], resuming: bool
) -> None:
    spec = state.spec
    trainable = _with_resources(spec)
    if resuming and _restorable(state.experiment_dir):
        tuner = tune.Tuner.restore(str(state.experiment_dir), trainable, resume_errored=True)
    else:
        # No Tune state yet (the driver died at once): start over with the trials MLflow does
        # not hold as completed or diverged (failed ones are retried, as Tune's restore does).
        trials = [t for t in space.plan_trials(spec) if t.trial_id not in done]
        if not trials:
            return
        grid = [{"id": t.trial_id, "config": t.config.to_dict(), "point": t.point} for t in trials]
        tuner = tune.Tuner(
            trainable,
            param_space={"study": _context(state), "trial": tune.grid_search(grid)},
            tune_config=_tune_config(spec, max_concurrent, _TrialNamer()),
            run_config=_run_config(state, spec.name, state.ray_dir),
        )
    _reconcile(state, tuner.fit())


def _fit_cell(
    state: StudyState,
    cell: space.Cell,
    max_concurrent: int | None,
    started_ids: set[str],
    echo: Echo,
) -> None:
    """One scientific x replicate cell: Optuna tunes the nuisance axes over n_samples trials."""
    spec = state.spec
    trainable = _with_resources(spec)
    name = f"cell{cell.index:03d}"
    folder = state.experiment_dir / name
    if _restorable(folder):
        tuner = tune.Tuner.restore(str(folder), trainable, resume_errored=True)
    elif set(cell.trial_ids()) & started_ids:
        # Without Tune's state, Optuna would sample the cell afresh under ids already used.
        echo(f"      {name}: no Ray state to resume its unfinished trials; skipped")
        return
    else:
        base = space.cell_config(spec, cell, {})
        searcher = OptunaSearch(
            metric=spec.search.metric, mode=spec.search.mode, seed=spec.search.seed + cell.index
        )
        point = {**cell.point, "seed": cell.seed}
        tuner = tune.Tuner(
            trainable,
            param_space={
                "study": _context(state),
                "trial": {"config": base.to_dict(), "point": point},
                "nuisance": {p: _domain(p, axis) for p, axis in cell.domains.items()},
            },
            tune_config=_tune_config(
                spec,
                max_concurrent,
                _TrialNamer(cell.first_trial),
                search_alg=searcher if cell.domains else None,
                num_samples=cell.n_samples,
            ),
            run_config=_run_config(state, name, state.experiment_dir),
        )
    _reconcile(state, tuner.fit())


def _restorable(folder: Path) -> bool:
    """Whether Tune saved enough to restore: tuner.pkl is written at once, but the trials live in
    the experiment-state snapshot, which a driver killed in its first moments never wrote."""
    return tune.Tuner.can_restore(str(folder)) and any(folder.glob("experiment_state-*.json"))


def _domain(param: str, axis: list[Any] | Range) -> Any:
    if isinstance(axis, list):
        return tune.choice(axis)
    integer = param in ("anneal_last", "hidden_size", "batch_size", "iterations", "eval_every")
    if integer:
        low, high = int(axis.min), int(axis.max) + 1  # randint's upper end is exclusive
        return tune.lograndint(low, high) if axis.scaling == "log" else tune.randint(low, high)
    if axis.scaling == "log":
        return tune.loguniform(axis.min, axis.max)
    return tune.uniform(axis.min, axis.max)


def _context(state: StudyState) -> dict[str, Any]:
    """What every trial needs besides its config: where and under which parent to log."""
    spec = state.spec
    return {
        "name": spec.name,
        "tracking_uri": state.tracking_uri,
        "parent_run_id": state.parent_run_id,
        "roles": space.roles(spec),
        "metric": spec.search.metric,
        "cpus": spec.resources.cpus,
        "task_options": list(spec.task_option_names),
    }


def _with_resources(spec: StudySpec) -> Any:
    resources = {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    return tune.with_resources(_trainable, resources)


def _tune_config(
    spec: StudySpec, max_concurrent: int | None, namer: _TrialNamer, **extra: Any
) -> tune.TuneConfig:
    return tune.TuneConfig(
        max_concurrent_trials=max_concurrent or spec.resources.max_concurrent,
        # One worker process serves trial after trial: torch, MLflow and the task data are
        # imported once per worker, not once per trial.
        reuse_actors=True,
        trial_name_creator=namer,
        trial_dirname_creator=namer,
        **extra,
    )


def _run_config(state: StudyState, name: str, storage: Path) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=str(storage),
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=state.spec.resources.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        callbacks=[_ProgressCallback()],
    )


def _reconcile(state: StudyState, results: Any) -> None:
    """Mark FAILED in MLflow the trials whose process died before it could say so itself."""
    spec = state.spec
    for result in results:
        if result.error is None:
            continue
        config = result.config
        if "nuisance" in config:
            trial_config = space.sample_config(
                config["trial"]["config"], config["nuisance"], list(spec.task_option_names)
            )
        else:
            trial_config = TrialConfig.from_dict(config["trial"]["config"])
        error = getattr(result.error, "cause", None) or result.error
        tracking.record_failure(
            state.tracking_uri,
            state.parent_run_id,
            Path(result.path).name,
            tracking.one_line(error),
            trial_config,
            space.roles(spec),
            spec.name,
        )


@contextlib.contextmanager
def _ray_session(address: str | None, spec: StudySpec) -> Iterator[None]:
    """Use the Ray already connected (tests), attach to `address`, or start a local Ray."""
    # Our one line per trial is the output; Ray's and Tune's logs stay in their files.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Tune's newer console output prints an experiment box even at verbose=0; the legacy one
    # honours it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray").setLevel(logging.ERROR)
    # Tune logs failed trials at ERROR ("Trials did not complete"); our lines already say so.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    if ray.is_initialized():
        yield
        return
    if tuple(int(part) for part in ray.__version__.split(".")[:2]) >= (2, 59):
        # Ray 2.59 turns on token authentication, which a local, single-user Ray does not need.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    # Ray's own convention: RAY_ADDRESS names the cluster to use when no flag does.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ConfigError(f"--address {address}: {tracking.one_line(error)}") from None
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(spec.resources.cpus))
        # "local": a new Ray of our own, even when a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
    try:
        yield
    finally:
        ray.shutdown()


def _parent_tags(spec: StudySpec) -> dict[str, str]:
    target = spec.target if spec.target is not None else TASKS[spec.task].default_target
    tags = {
        "study.n_trials": str(space.n_trials(spec)),
        "study.target": str(target),
        "study.spec_hash": spec.spec_hash(),
        "study.version": _version(),
        "study.searcher": spec.search.searcher,
        "study.smoke": str(spec.smoke).lower(),
        "study.source": spec.source,
    }
    commit = _git_commit()
    if commit:
        tags["study.git_commit"] = commit
    return tags


def _version() -> str:
    try:
        return metadata.version("hdetach-study")
    except metadata.PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    """The checkout's commit, with "-dirty" when it has uncommitted changes; None outside git."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def _store_exists(uri: str) -> bool:
    prefix = "sqlite:///"
    return not uri.startswith(prefix) or Path(uri[len(prefix) :]).is_file()


def _store_label(uri: str) -> str:
    prefix = "sqlite:///"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def _server_uri(uri: str) -> str | None:
    return uri if uri.startswith(("http://", "https://")) else None
