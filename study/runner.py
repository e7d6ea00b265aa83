"""Ray Tune: trainable around train() and train_packed(), Tuners, resume (the only ray import)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
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
from study.config import INT_FIELDS, ConfigError, TrialConfig, check_reachable, make_folder
from study.packed_train import train_packed
from study.spec import AUTO_GPUS, Range, StudySpec, spec_from_mapping
from study.tasks import TASKS
from study.train import (
    COMPLETED,
    DIVERGED,
    RUNNING,
    Progress,
    Reporter,
    resolve_device,
    train,
)

STATE_FILE = "study.json"  # our own record of a study, next to Ray's state in DIR/ray/NAME
# Each Ray trial's latest state, one file per trial in DIR/ray/NAME/TRIAL_STATES, replaced at
# every evaluation. Not Tune checkpoints: after a killed driver, Tune's experiment snapshot (taken
# every 10 s or more) can name a checkpoint its rotation has already deleted, and the trial then
# cannot be resumed at all. Tune restarts unfinished trials; they continue from this file.
TRIAL_STATES = "trial_states"
Echo = Callable[[str], None]
Tags = dict[str, str]


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

    def save(self) -> None:
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "name": self.spec.name,
            "source": self.spec.source,
            "smoke": self.spec.smoke,
            "spec": self.spec.raw,
            "tracking_uri": self.tracking_uri,
            # The store is the folder's own DIR/mlflow.db: MLflow keeps its absolute path and
            # those of the artifacts, so the folder cannot move (load() checks).
            "own_store": self.own_store,
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
        try:
            record = json.loads(path.read_text())
            spec = spec_from_mapping(record["spec"], name=record["name"], where=record["source"])
            state = cls(
                spec=replace(spec, smoke=record["smoke"]),
                output=output.absolute(),
                tracking_uri=record["tracking_uri"],
                parent_run_id=record["parent_run_id"],
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            reason = tracking.one_line(error)
            raise ConfigError(f"{path}: not a readable study record ({reason})") from None
        if record.get("own_store") and not state.own_store:
            # Moved, or copied: resuming would log to the store it names, in the old folder.
            database = tracking.sqlite_path(state.tracking_uri)
            home = database.parent if database else state.tracking_uri
            raise ConfigError(
                f"study {name}: its MLflow store {database} belongs to {home}, not "
                f"{state.output} (MLflow keeps absolute paths); resume it with --output {home}, "
                "moving the folder back first if it was moved"
            )
        return state


# ---------------------------------------------------------------- the trainable (trial process)


def _trainable(config: dict[str, Any]) -> None:
    """One Ray trial: a trial, or a pack of trials trained as one batched model, with every
    evaluation logged to each trial's MLflow run and reported to Tune."""
    study = config["study"]
    # Ray reserves `cpus` cores for the trial; torch would otherwise use every core on the node.
    torch.set_num_threads(max(1, int(study["cpus"])))
    node = ray.get_runtime_context().get_node_id()
    ray_trial = tune.get_context().get_trial_name()
    members = [
        _Member(study, trial_id, trial_config, tags, node)
        for trial_id, trial_config, tags in _members_of(config, ray_trial)
    ]
    state_file = Path(study["trial_states"]) / f"{ray_trial}.pt"
    try:
        if "pack" in config:
            _train_pack_and_report(members, study["mode"], state_file)
        else:
            _train_and_report(members[0], state_file)
    except Exception as error:
        for member in members:
            if not member.finished:
                member.run.fail(error)
        raise
    for member in members:
        if not member.finished:
            member.finish()


def _members_of(config: dict[str, Any], ray_trial: str) -> list[tuple[str, TrialConfig, Tags]]:
    """(trial id, config, extra MLflow tags) of each trial a Ray trial runs."""
    if "pack" in config:
        pack = config["pack"]
        tags = {"study.pack": pack["id"], "study.pack_size": str(pack["size"])}
        return [(m["id"], TrialConfig.from_dict(m["config"]), tags) for m in pack["members"]]
    if "nuisance" in config:
        trial_config = space.sample_config(
            config["trial"]["config"], config["nuisance"], config["study"]["task_options"]
        )
    else:
        trial_config = TrialConfig.from_dict(config["trial"]["config"])
    return [(ray_trial, trial_config, {})]


class _Member:
    """One trial inside a Ray trial (alone or packed): its MLflow run and what Tune hears of it."""

    def __init__(
        self, study: dict[str, Any], trial_id: str, config: TrialConfig, tags: Tags, node: str
    ) -> None:
        self.trial_id = trial_id
        self.config = config
        self.metric = study["metric"]
        self.run = tracking.TrialRun(
            study["tracking_uri"],
            study["parent_run_id"],
            trial_id,
            config,
            study["roles"],
            study["name"],
            tags,
        )
        # Which Ray node ran the trial (the last attempt's, after a retry): shows a study's spread.
        self.run.mlflow.set_tag(self.run.run_id, "ray.node_id", node)
        # What it trains on: `device: auto` is resolved on the node, and a curve depends on it.
        self.run.mlflow.set_tag(self.run.run_id, "device.used", _device_label(config.device))
        self.status = RUNNING
        self.iteration = -1
        self.latest: dict[str, Any] = {}
        self.checkpoint: Callable[[], dict[str, Any]] | None = None
        self.finished = False

    def record(self, progress: Progress) -> None:
        self.latest.update(progress.metrics)
        if progress.status == DIVERGED:
            # A searcher must not rank a diverged trial by its old values.
            self.latest[self.metric] = math.nan
        self.run.log(progress.iteration, progress.metrics)
        self.iteration, self.status = progress.iteration, progress.status
        self.checkpoint = progress.checkpoint

    def result(self) -> dict[str, Any]:
        # Tune checks that every result holds the searcher's metric.
        return {
            self.metric: math.nan,
            **self.latest,
            "iteration": self.iteration,
            "outcome": self.status,
        }

    def finish(self) -> None:
        self.run.finish(self.status)
        self.finished = True


def _device_label(name: str) -> str:
    """The device for a tag: cpu, or e.g. cuda:0 (NVIDIA H100 80GB HBM3)."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _train_and_report(member: _Member, state_file: Path) -> None:
    saved = _restore(state_file)
    if saved is not None and saved["status"] in (COMPLETED, DIVERGED):
        member.status = saved["status"]  # it had finished when the driver died
        return

    def report(progress: Progress) -> None:
        member.record(progress)
        saved = {"status": progress.status, "state": progress.checkpoint()}
        _report(member.result(), saved, state_file)

    resume_from = saved["state"] if saved is not None else None
    member.status = train(member.config, report, resume_from=resume_from).status


def _train_pack_and_report(members: list[_Member], mode: str, state_file: Path) -> None:
    """train_packed over the members still running; one Tune report per evaluation, once every
    running member has reported it, after saving each member's state to `state_file`."""
    saved = (_restore(state_file) or {}).get("members", {})
    for member in members:
        if member.trial_id in saved:
            restored = saved[member.trial_id]
            member.status, member.iteration = restored["status"], restored["iteration"]
            member.latest = dict(restored["latest"])
    running = [member for member in members if member.status == RUNNING]
    unreported = False

    def report_pack() -> None:
        nonlocal unreported
        states = {
            member.trial_id: {
                "status": member.status,
                "iteration": member.iteration,
                "latest": member.latest,
                # Finished members are not trained again: their state is not needed.
                "state": member.checkpoint() if member.status == RUNNING else None,
            }
            for member in members
        }
        _report(_pack_result(members, mode), {"members": states}, state_file)
        unreported = False

    def reporter(member: _Member) -> Reporter:
        def report(progress: Progress) -> None:
            nonlocal unreported
            member.record(progress)
            unreported = True
            if progress.status == DIVERGED:
                member.finish()  # its run says so now; the others go on
            elif all(
                other.iteration == progress.iteration
                for other in running
                if other.status != DIVERGED
            ):
                report_pack()

        return report

    if running:
        train_packed(
            [member.config for member in running],
            [reporter(member) for member in running],
            [
                saved[member.trial_id]["state"] if member.trial_id in saved else None
                for member in running
            ],
        )
    if unreported:  # every member left diverged between two evaluations
        report_pack()


def _pack_result(members: list[_Member], mode: str) -> dict[str, Any]:
    """What Tune sees of a pack: its best member's metric, its outcome (running until every
    member has finished) and each member's own result under its trial id."""
    metric = members[0].metric
    values = [member.latest.get(metric, math.nan) for member in members]
    finite = [value for value in values if not math.isnan(value)]
    statuses = {member.status for member in members}
    if RUNNING in statuses:
        outcome = RUNNING
    else:
        outcome = COMPLETED if COMPLETED in statuses else DIVERGED
    result = {
        metric: (max if mode == "max" else min)(finite) if finite else math.nan,
        "iteration": max(member.iteration for member in members),
        "outcome": outcome,
    }
    for member in members:
        result.update({f"{member.trial_id}/{k}": v for k, v in member.result().items()})
    return result


def _report(result: dict[str, Any], saved: dict[str, Any], state_file: Path) -> None:
    """Save the trial's state, then tell Tune its result (a retry or resume finds the state)."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    partial = state_file.with_suffix(".partial")
    torch.save(saved, partial)
    os.replace(partial, state_file)  # a killed driver never leaves half a file
    tune.report(result)


def _restore(state_file: Path) -> dict[str, Any] | None:
    """The last saved {"status", "state"} (a trial) or {"members": {id: ...}} (a pack)."""
    if not state_file.exists():
        return None
    return torch.load(state_file, weights_only=True)


class _TrialNamer:
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


# ---------------------------------------------------------------- the driver


class _Reporter:
    """Prints one line per finished trial (each member of a pack), numbered across sessions."""

    def __init__(
        self, state: StudyState, total: int, finished: set[str], done: set[str], echo: Echo
    ) -> None:
        self.state = state
        self.total = total
        self.finished = set(finished)
        # Trials that completed or diverged in an earlier session: Tune may run them (or their
        # pack, for its other members) again, and they must not be printed twice.
        self.done_before = set(done)
        self.echo = echo

    def error(self, trial: Any) -> str:
        """The error the trial (a pack: its first member that has one) recorded in MLflow
        itself, else the one Ray kept."""
        for trial_id, _, _ in _members_of(trial.config, str(trial)):
            run = tracking.find_trial_run(
                self.state.tracking_uri, self.state.parent_run_id, trial_id
            )
            if run is not None and run.data.tags.get("error"):
                return run.data.tags["error"]
        return _trial_error(trial)

    def lines(self, trial: Any, error: str | None = None) -> None:
        """The lines of a Ray trial that ended: completed, or failed with `error`."""
        result = trial.last_result or {}
        if "pack" not in trial.config:
            if str(trial) in self.done_before:
                # It finished in an earlier session, after Tune's last snapshot: Tune runs it
                # again, it returns at once (its saved state says finished), and Tune ends it
                # with the snapshot's stale last result. Its line was printed back then.
                return
            outcome = result.get("outcome", COMPLETED) if error is None else tracking.FAILED
            point = {**trial.config["trial"]["point"], **trial.config.get("nuisance", {})}
            self._line(str(trial), point, outcome, result.get("best/val_accuracy"), result, error)
            return
        for member in trial.config["pack"]["members"]:
            trial_id = member["id"]
            if trial_id in self.done_before:
                continue
            outcome = result.get(f"{trial_id}/outcome", COMPLETED if error is None else RUNNING)
            if error is not None and outcome not in (COMPLETED, DIVERGED):
                outcome = tracking.FAILED  # the pack failed while this member was running
            best = result.get(f"{trial_id}/best/val_accuracy")
            self._line(trial_id, member["point"], outcome, best, result, error)

    def _line(
        self,
        trial_id: str,
        point: dict[str, Any],
        outcome: str,
        best: float | None,
        result: dict[str, Any],
        error: str | None,
    ) -> None:
        self.finished.add(trial_id)
        self.echo(
            console.trial_line(
                len(self.finished),
                self.total,
                trial_id,
                point,
                outcome,
                best,
                result.get("time_total_s"),
                error or "",
            )
        )


# Tune pickles its callbacks with the experiment and restores *those* on resume, so the callback
# keeps no state of its own and prints through the reporter of the current session.
_reporter: _Reporter | None = None


class _ProgressCallback(tune.Callback):
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _reporter is not None:
            _reporter.lines(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _reporter is not None:
            _reporter.lines(trial, _reporter.error(trial))

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
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: not a folder")
    flag = "--tracking-uri" if tracking_uri is not None else f"--output {output}"
    uri, _ = tracking.checked_store(tracking_uri or tracking.store_uri(output), flag)
    _refuse_existing(spec, output, uri)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        _check_data_here(spec)  # the local trials read this machine's files
    # Ray first: a wrong --address or a GPU request Ray cannot meet leaves no study behind.
    with _ray_session(address, spec):
        _check_gpus(spec, address, echo)
        make_folder(output, "--output")
        artifacts = None
        if tracking_uri is None:
            artifacts = (tracking.artifact_dir(output) / spec.name).as_uri()
        experiment_id = tracking.ensure_experiment(uri, spec.name, artifacts)
        parent = tracking.start_parent(
            uri, experiment_id, spec.name, _parent_tags(spec), spec.to_yaml()
        )
        state = StudyState(spec, output, uri, parent)
        state.save()
        return _execute(state, max_concurrent, echo, resuming=False)


def _check_data_here(spec: StudySpec) -> None:
    """The task's data check for each distinct set of task options the study trains with: a
    wrong data_dir fails every trial alike, each after Ray's retries."""
    if spec.search.searcher == "optuna":
        configs = [space.cell_config(spec, cell, {}) for cell in space.plan_cells(spec)]
    else:
        configs = [trial.config for trial in space.plan_trials(spec)]
    checked = set()
    for config in configs:
        options = json.dumps(config.task_options, sort_keys=True)
        if options not in checked:
            checked.add(options)
            try:
                TASKS[spec.task].check_data(config.task_options)
            except ConfigError as error:
                raise ConfigError(f"{spec.source}: {error}") from None


def _refuse_existing(spec: StudySpec, output: Path, uri: str) -> None:
    """A new study must not meet an old one of its name: in the MLflow store (its runs), or in
    the output folder's Ray state (whose saved trial states would pass for this study's)."""
    parent = tracking.find_parent(uri, spec.name) if tracking.store_exists(uri) else None
    if parent is not None:
        tags = parent.data.tags
        where = f"study {spec.name} already exists in {_store_label(uri)}"
        if tags.get("study.spec_hash") != spec.spec_hash():
            # `study resume` would continue that other search space, not this one.
            smoke = " (its smoke variant)" if tags.get("study.smoke") == "true" else ""
            raise ConfigError(
                f"{where}, from a different search space{smoke}; run this one into another "
                "--output (study resume continues the existing one)"
            )
        raise ConfigError(
            f"{where}; continue it with `study resume {spec.name} --output {output}`, or run "
            "into another --output"
        )
    ray_state = output / "ray" / spec.name
    if ray_state.exists():
        earlier = ""
        try:
            record = json.loads((ray_state / STATE_FILE).read_text())
            earlier = f", logged to {_store_label(record['tracking_uri'])}"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no readable study.json: the folder alone is reason enough
        raise ConfigError(
            f"study {spec.name}: {ray_state} holds the Ray state of an earlier run{earlier}; "
            f"continue it with `study resume {spec.name} --output {output}`, or remove that "
            "folder, or run into another --output"
        )


def _check_gpus(spec: StudySpec, address: str | None, echo: Echo) -> None:
    """Say what `gpus: auto` resolved to, and refuse what Ray cannot give: such trials would wait
    for ever, silently (Ray's warning goes to its log). On a cluster an autoscaler may still add
    GPU nodes, so there it only says so."""
    per_trial = _gpus_per_trial(spec)
    found = ray.cluster_resources().get("GPU", 0)
    if spec.resources.gpus == AUTO_GPUS:
        echo(f"resources.gpus: auto -> {per_trial:g} per trial (GPUs in Ray: {found:g})")
    cuda = set()
    for axes in (spec.fixed, spec.scientific, spec.nuisance):
        value = axes.get("device", "auto")  # a fixed value, or a grid axis (a list)
        cuda |= {str(v) for v in (value if isinstance(value, list) else [value])}
    cuda -= {"cpu", "auto"}
    if cuda and per_trial == 0:
        if spec.resources.gpus == AUTO_GPUS:
            raise ConfigError(
                f"device: {min(cuda)} needs a GPU, but resources.gpus: auto found none in Ray; "
                "use device: auto (the CPU then) or a Ray cluster with GPUs (--address)"
            )
        raise ConfigError(
            f"device: {min(cuda)} needs resources.gpus >= 1 (Ray gives GPUs only to trials "
            "that ask for them); or device: auto"
        )
    if per_trial > found:
        message = f"resources.gpus: {per_trial:g} per trial, but Ray has {found:g} GPU(s)"
        if address is None and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(f"{message} on this machine; use gpus: auto or 0")
        echo(f"{message}: trials wait for a GPU node")


def resume_study(
    name: str, output: Path, *, address: str | None = None, echo: Echo = print
) -> int:
    """Continue an interrupted study: Tune restores its trials, errored ones included."""
    state = StudyState.load(output, name)
    tracking.checked_store(state.tracking_uri, f"study {name}'s tracking URI")
    if tracking.find_parent(state.tracking_uri, name) is None:
        raise ConfigError(
            f"study {name}: no parent run in {_store_label(state.tracking_uri)}; was it deleted?"
        )
    # Ray first, as run_study: a refused start leaves the parent run as it was, not RUNNING.
    with _ray_session(address, state.spec):
        _check_gpus(state.spec, address, echo)
        tracking.reopen_run(state.tracking_uri, state.parent_run_id)
        return _execute(state, None, echo, resuming=True)


def _execute(state: StudyState, max_concurrent: int | None, echo: Echo, resuming: bool) -> int:
    """Fit the study's trials on the connected Ray (run_study and resume_study open it)."""
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
        f"({len(finished)} finished), {spec.search.searcher} search{_packs_label(spec)}; "
        f"MLflow {_store_label(state.tracking_uri)}, Ray state {state.experiment_dir}"
    )
    _reporter = _Reporter(state, total, finished, done, echo)
    try:
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
    ui = console.ui_command(str(state.output), None if state.own_store else state.tracking_uri)
    echo(f"MLflow UI: {ui}")
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
        axis, points = _grid_points(spec, done)
        if not points:
            return
        tuner = tune.Tuner(
            trainable,
            param_space={"study": _context(state), axis: tune.grid_search(points)},
            tune_config=_tune_config(spec, max_concurrent, _TrialNamer()),
            run_config=_run_config(state, spec.name, state.ray_dir),
        )
    _reconcile(state, tuner.fit())


def _grid_points(spec: StudySpec, done: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """The Tune grid: one point per trial ("trial"), or per pack ("pack") when resources.pack > 1,
    leaving out the trials in `done`."""

    def planned(trial: space.PlannedTrial) -> dict[str, Any]:
        return {"id": trial.trial_id, "config": trial.config.to_dict(), "point": trial.point}

    if spec.resources.pack == 1:
        return "trial", [planned(t) for t in space.plan_trials(spec) if t.trial_id not in done]
    packs = [
        {
            "id": pack.pack_id,
            "size": len(pack.trials),
            "members": [planned(t) for t in pack.trials if t.trial_id not in done],
        }
        for pack in space.plan_packs(spec)
    ]
    return "pack", [pack for pack in packs if pack["members"]]


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
    if param in INT_FIELDS:
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
        "mode": spec.search.mode,
        "cpus": spec.resources.cpus,
        "task_options": list(spec.task_option_names),
        "trial_states": str(state.experiment_dir / TRIAL_STATES),
    }


def _with_resources(spec: StudySpec) -> Any:
    resources = {"cpu": spec.resources.cpus, "gpu": _gpus_per_trial(spec)}
    return tune.with_resources(_trainable, resources)


def _gpus_per_trial(spec: StudySpec) -> float:
    """resources.gpus, with "auto" resolved against the connected Ray cluster: one GPU per
    trial (or pack) where it has GPUs, none where it has none (trials with `device: auto`
    then train on the CPU)."""
    if spec.resources.gpus != AUTO_GPUS:
        return float(spec.resources.gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


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
        callbacks=[_ProgressCallback()],
    )


def _reconcile(state: StudyState, results: Any) -> None:
    """Mark FAILED in MLflow the trials whose process died before it could say so itself."""
    spec = state.spec
    for result in results:
        if result.error is None:
            continue
        error = getattr(result.error, "cause", None) or result.error
        for trial_id, trial_config, tags in _members_of(result.config, Path(result.path).name):
            tracking.record_failure(
                state.tracking_uri,
                state.parent_run_id,
                trial_id,
                tracking.one_line(error),
                trial_config,
                space.roles(spec),
                spec.name,
                tags,
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
    # Tune's TensorBoard logger warns "NaN or Inf found in input tensor." for a diverged
    # trial's last report; divergence is an outcome, and our line for the trial says so.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    # Optuna announces each cell's in-memory study ("A new study created in memory ...") at
    # INFO, between our trial lines; its warnings still show.
    logging.getLogger("optuna").setLevel(logging.WARNING)
    if ray.is_initialized():
        yield
        return
    if tuple(int(part) for part in ray.__version__.split(".")[:2]) >= (2, 59):
        # Ray 2.59 turns on token authentication, which a local, single-user Ray does not need.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    # Ray's own convention: RAY_ADDRESS names the cluster to use when no flag does.
    flag = "--address" if address is not None else "RAY_ADDRESS"
    address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _check_ray_address(address, flag)
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as error:
            reason = tracking.one_line(error)
            raise ConfigError(
                f"{flag} {address}: {reason}; expected HOST:PORT of a Ray head"
            ) from None
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(spec.resources.cpus))
        # "local": a new Ray of our own, even when a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
    # A SIGTERM (a scheduler's, `timeout`'s, `kill`'s) stops the study as Ctrl-C does: Tune
    # ends its trials, the summary and the resume line are printed, and the parent run is
    # marked KILLED. Set after ray.init, whose own handler would dump a stack trace and exit.
    previous = signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()


def _stop_as_on_ctrl_c(signum: int, frame: Any) -> None:
    signal.raise_signal(signal.SIGINT)


def _check_ray_address(address: str, flag: str = "--address") -> None:
    """HOST:PORT (or ray://HOST:PORT) must accept a connection: ray.init would otherwise retry
    for minutes, printing only Ray's own warnings. "auto" and other forms go to Ray as given."""
    if not address.strip():
        raise ConfigError(f"{flag}: empty; expected HOST:PORT of a Ray head, or no {flag}")
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address)
    if match is not None:
        hint = "is `ray start --head` running there (see docker/README.md)?"
        check_reachable(f"{flag} {address}", match[1], int(match[2]), hint)


def _packs_label(spec: StudySpec) -> str:
    if spec.resources.pack == 1:
        return ""
    return f", {len(space.plan_packs(spec))} packs of <= {spec.resources.pack}"


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


def _store_label(uri: str) -> str:
    database = tracking.sqlite_path(uri)
    return str(database) if database is not None else uri
