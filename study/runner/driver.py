"""The driver: run a new study or resume one, fit its Tuners on the connected Ray, mark FAILED
the trials whose process died, and print the summary."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from study import console, space, tracking
from study.errors import ConfigError, absolute, make_folder, one_line
from study.invocation import program
from study.pack_layout import GpuModel
from study.runner import orphans
from study.runner.preflight import check_data_here, check_gpus, refuse_existing
from study.runner.progress import ConsoleProgress
from study.runner.session import ray_session
from study.runner.state import StudyState
from study.runner.trainable import members_of
from study.runner.tuner import Tuners, cell_name
from study.space import Plan
from study.spec import StudySpec
from study.tracking import StudyContext, Tracker, stops, stores
from study.tracking.stores import driving
from study.tracking.tags import pack_gpu_from_tags, parent_status, parent_tags
from study.vocabulary import COMPLETED, DIVERGED, FAILED, RUNNING

Echo = Callable[[str], None]


def run_study(
    spec: StudySpec,
    output: Path,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    max_concurrent: int | None = None,
    echo: Echo = print,
    gpu: GpuModel | None = None,
) -> int:
    """Run a new study; returns the exit status: 0 when every trial finished (completed or
    diverged), 1 when some trial failed, 130 when interrupted with trials left. `gpu` sizes
    `resources.pack: auto` (its parent run's tags keep it for `study resume`)."""
    output = absolute(output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: not a folder")
    orphans.end_orphans(output / "ray", echo)  # a killed study's Ray, in this folder
    flag = "--tracking-uri" if tracking_uri is not None else f"--output {output}"
    uri, exists = tracking.checked_store(tracking_uri or tracking.store_uri(output), flag)
    if tracking_uri is not None:
        stores.check_folder(uri)  # DIR/mlflow.db's folder is --output, made below
    refuse_existing(spec, output, uri, exists)
    plan = space.make_plan(spec, gpu)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        check_data_here(plan)  # the local trials read this machine's files
    # Ray first: a wrong --address or a GPU request Ray cannot meet leaves no study behind.
    with ray_session(address, spec.resources.cpus) as session_dir:
        check_gpus(spec, address, echo)
        make_folder(output, "--output")
        with driving(output / "ray" / spec.name, spec.name):
            tracker = tracking.open_store(uri)
            experiment_id = tracker.ensure_experiment(spec.name, output)
            tags = parent_tags(plan)
            parent = tracker.start_parent(experiment_id, spec.name, tags, spec.to_yaml())
            state = StudyState(spec, output, uri, parent)
            state.save()
            if session_dir is not None:
                orphans.record(state.experiment_dir, session_dir)
            return _execute(state, plan, tracker, max_concurrent, echo, resuming=False)


def resume_study(
    name: str, output: Path, *, address: str | None = None, echo: Echo = print
) -> int:
    """Continue an interrupted study: Tune restores its trials, errored ones included."""
    state = StudyState.load(output, name)
    with driving(state.experiment_dir, name):
        return _resume(state, address, echo)


def _resume(state: StudyState, address: str | None, echo: Echo) -> int:
    name = state.spec.name
    orphans.end_orphans(state.ray_dir, echo)  # the Ray of the session that was killed
    _, exists = tracking.checked_store(state.tracking_uri, f"study {name}'s tracking URI")
    if not exists:  # opening it would create an empty database where the study's runs were
        raise ConfigError(
            f"study {name}: its MLflow database {tracking.store_label(state.tracking_uri)} "
            "is not there; was it deleted or moved? (nothing to resume into)"
        )
    tracker = tracking.open_store(state.tracking_uri)
    parent = tracker.find_parent(name)
    if parent is None:
        raise ConfigError(
            f"study {name}: no parent run in {tracking.store_label(state.tracking_uri)}; "
            "was it deleted?"
        )
    # Packs sized for the GPU the study was planned for, whatever this machine has.
    plan = space.make_plan(state.spec, pack_gpu_from_tags(parent.tags))
    # Ray first, as run_study: a refused start leaves the parent run as it was, not RUNNING.
    with ray_session(address, state.spec.resources.cpus) as session_dir:
        check_gpus(state.spec, address, echo)
        if session_dir is not None:
            orphans.record(state.experiment_dir, session_dir)
        tracker.reopen(state.parent_run_id)
        return _execute(state, plan, tracker, None, echo, resuming=True)


def _execute(
    state: StudyState,
    plan: Plan,
    tracker: Tracker,
    max_concurrent: int | None,
    echo: Echo,
    resuming: bool,
) -> int:
    """Fit the study's trials on the connected Ray (run_study and resume_study open it)."""
    spec = state.spec
    started = time.monotonic()
    before = tracker.summarize(spec.name)
    trials = before.trials if before else []
    started_ids = {t.trial_id for t in trials}
    finished = {t.trial_id for t in trials if t.state != RUNNING}
    done = {t.trial_id for t in trials if t.state in (COMPLETED, DIVERGED)}
    verb = "resuming" if resuming else "running"
    packs = f", {len(plan.packs)} packs of <= {plan.pack_size}" if plan.packed else ""
    echo(
        f"{verb} {spec.name}{' (smoke)' if spec.smoke else ''}: {plan.n_trials} trials "
        f"({len(finished)} finished), {spec.search.searcher} search{packs}; "
        f"MLflow {tracking.store_label(state.tracking_uri)}, Ray state {state.experiment_dir}"
    )
    context = state.context(plan)
    progress = ConsoleProgress(tracker, state.parent_run_id, plan.n_trials, finished, done, echo)
    tuners = Tuners(state, plan, context, max_concurrent, progress)
    outcomes: dict[str, str | None] = {}  # each trial's outcome, by trial id (_reconcile)
    if plan.optuna:
        for cell in plan.cells:
            tuner = tuners.cell(cell, started_ids)
            if tuner is None:
                skipped = "no Ray state to resume its unfinished trials; skipped"
                echo(f"      {cell_name(cell)}: {skipped}")
                continue
            cell_outcomes = _reconcile(tracker, context, tuner.fit())
            outcomes.update(cell_outcomes)
            if any(outcome in (None, RUNNING) for outcome in cell_outcomes.values()):
                # Ctrl-C or SIGTERM ended this cell's fit: the study stops here, as a grid does,
                # rather than start the next cell's Tuner (the signal was for the study).
                echo(f"      stopped in {cell_name(cell)}: the cells after it are not started")
                break
    else:
        tuner = tuners.grid(done, resuming)
        if tuner is not None:
            outcomes.update(_reconcile(tracker, context, tuner.fit()))
    # Stopped (Ctrl-C, SIGTERM): Tune ended the trials' processes, not their runs.
    stops.close_unfinished(tracker, spec.name, outcomes)
    summary = tracker.summarize(spec.name)
    assert summary is not None
    failed, pending = summary.count(FAILED), summary.pending
    status = parent_status(summary)
    tracker.end(state.parent_run_id, status)
    echo(console.summary_table(summary))
    echo(f"took {time.monotonic() - started:.0f} s")
    if pending:
        resume = f"{program()} resume {spec.name} --output {shlex.quote(str(state.output))}"
        echo(f"unfinished; continue with: {resume}")
    ui = console.ui_command(str(state.output), None if state.own_store else state.tracking_uri)
    echo(f"MLflow UI: {ui}")
    if failed:
        return 1
    return 130 if pending else 0  # pending after fit: interrupted (Ctrl-C), as main() reports it


def _reconcile(tracker: Tracker, context: StudyContext, results: Any) -> dict[str, str | None]:
    """Mark FAILED in MLflow the trials whose process died before it could say so itself;
    returns each trial's outcome by trial id: what it last reported to Tune (None when it never
    reported: Tune was stopped before it started), FAILED for one whose process died. A fit
    that returns with a trial still running or never started was stopped (Ctrl-C, SIGTERM):
    no scheduler stops trials early here."""
    outcomes: dict[str, str | None] = {}
    for result in results:
        if not result.config:  # stopped before Tune set the trial up: it never ran
            continue
        members = members_of(result.config, Path(result.path).name)
        metrics = result.metrics or {}
        for trial_id, _, _ in members:
            # A pack reports each member's outcome under its id, a lone trial its own.
            outcomes[trial_id] = metrics.get(f"{trial_id}/outcome", metrics.get("outcome"))
        if result.error is None:
            continue
        error = getattr(result.error, "cause", None) or result.error
        for trial_id, trial_config, tags in members:
            tracker.record_failure(context, trial_id, one_line(error), trial_config, tags)
            outcomes[trial_id] = FAILED
    return outcomes
