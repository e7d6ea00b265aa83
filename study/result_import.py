"""`study import`: result files (study/results.py) into an MLflow store, as `study run` would
have logged them: the study's experiment and parent run, one child run per trial with the plan's
params, and nothing the store holds already. Files of another study or space, or not of the
plan, are refused one line each, and the others still import."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from study.config import TrialConfig, resolve_precision
from study.errors import ConfigError, absolute, make_folder, one_line
from study.results import (
    ResultError,
    StudyInfo,
    TrialRecord,
    check_same_study,
    read_record,
    result_files,
)
from study.switches import switches_text
from study.vocabulary import COMPLETED, DIVERGED, FAILED

if TYPE_CHECKING:
    from study.space import Plan
    from study.spec import StudySpec


def import_results(
    folders: Sequence[Path],
    output: Path,
    tracking_uri: str | None = None,
    name: str | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Create or complete the study of the result files in `folders` in the store of study
    folder `output` (or at `tracking_uri`): its experiment, its parent run and one child run
    per trial, exactly as `study run` makes them. Files the store holds already add nothing;
    a damaged file, or one of another study or space, is refused with one line and changes
    nothing, the others are imported. Exit status 0, or 1 when a file was refused."""
    # MLflow: `study trial --space` writes these files without it.
    from study.tracking.stores import driving

    found = _gather(folders)
    records = [(path, record) for path, record, _ in found if record is not None]
    if not records and not any(message for _, _, message in found):
        shown = " ".join(str(folder) for folder in folders)
        raise ConfigError(f"{shown}: no result files (t0000.json ...) to import")
    counts = Counter(record.study.name for _, record in records)
    if len(counts) > 1:  # the first file's study would have decided, the others refused
        shown = ", ".join(f"{study}: {n}" for study, n in sorted(counts.items()))
        raise ConfigError(
            f"{' '.join(str(folder) for folder in folders)}: result files of {len(counts)} "
            f"studies ({shown} files); import each study's files on their own"
        )
    output = absolute(output)
    study_name = name or (records[0][1].study.name if records else "")
    ray_state = output / "ray" / study_name
    # A driver running the study in this folder holds its lock: its trials would log again
    # the steps this wrote. No Ray state there: no driver to wait for, and no folder to make.
    with driving(ray_state, study_name) if records and ray_state.is_dir() else nullcontext():
        return _import_found(found, output, tracking_uri, name, echo)


def _import_found(
    found: list[tuple[Path, TrialRecord | None, str]],
    output: Path,
    tracking_uri: str | None,
    name: str | None,
    echo: Callable[[str], None],
) -> int:
    from study import tracking
    from study.space import make_plan
    from study.tracking import imports
    from study.tracking.tags import pack_gpu_from_tags, pack_tags, parent_status

    refusals = [message for _, _, message in found if message]
    records = [(path, record) for path, record, _ in found if record is not None]
    flag = "--tracking-uri" if tracking_uri else f"--output {output}"
    uri, exists = tracking.checked_store(tracking_uri or tracking.store_uri(output), flag)
    # A store not there yet is made only once a file is accepted: refusing every file must
    # leave nothing behind.
    tracker = tracking.open_store(uri) if exists else None
    accepted: dict[str, tuple[Path, TrialRecord]] = {}
    plan: Plan | None = None
    if records:
        first = records[0][1].study
        study_name = name or first.name
        parent = tracker.find_parent(study_name) if tracker else None
        space_hash = parent.tags.get("study.spec_hash", "") if parent else first.space_hash
        for path, record in records:
            try:
                check_same_study(record, first.name, space_hash, path)
                if plan is None:  # sized as the study already is, else as its first file
                    gpu = pack_gpu_from_tags(parent.tags) if parent else record.plan_gpu
                    plan = make_plan(study_spec(record.study, study_name, path), gpu)
                _check_planned(record, plan, path)
            except ResultError as error:
                refusals.append(str(error))
                continue
            _keep_furthest(accepted, path, record)
    for message in refusals:
        echo(f"refused: {message}")
    if not accepted:
        echo("nothing imported")
        return 1
    assert plan is not None
    if tracker is None:
        if tracking_uri is None:
            make_folder(output, "--output")
        tracker = tracking.open_store(uri)
    spec = plan.spec
    chosen = [record for _, record in sorted(accepted.values(), key=lambda item: item[1].trial_id)]
    provenance_of = chosen[0]
    tags = imports.imported_parent_tags(
        plan, provenance_of.git_commit, provenance_of.machine.get("hdetach_study", "unknown")
    )
    parent_run_id, created = imports.ensure_parent(
        tracker, spec.name, tags, spec.to_yaml(), output
    )
    context = tracking.StudyContext(
        name=spec.name,
        tracking_uri=uri,
        parent_run_id=parent_run_id,
        roles=plan.roles,
        metric=spec.search.metric,
        mode=spec.search.mode,
        cpus=spec.resources.cpus,
        task_options=spec.task_option_names,
        trial_states="",  # no Ray state: nothing trains here
    )
    added = 0
    # Each trial's params are the plan's config, as `study run` logs them: a file that says
    # fp32 where the plan says auto (it computed the same, _same_trial) must still pair with
    # the other files' trials in the report. What it computed in is its precision.used tag.
    planned = {trial.trial_id: trial.config for trial in plan.trials}
    for record in chosen:
        extra = pack_tags(record.pack_id, record.pack_size) if plan.packed else {}
        if record.machine.get("cpu_cells"):  # as a Ray trial on a CPU tags it
            extra = {**extra, "cpu_cells.used": record.machine["cpu_cells"]}
        if record.machine.get("switches"):  # as a Ray trial run with HDETACH_* set tags it
            extra = {**extra, "switches.set": switches_text(record.machine["switches"])}
        added += imports.import_trial(
            tracker,
            context,
            record.trial_id,
            planned[record.trial_id],
            {**extra, "device.used": record.device, "precision.used": record.precision_used},
            record.curve,
            record.status,
            record.error,
        )
    summary = tracker.summarize(spec.name)
    assert summary is not None
    if added or created:
        tracker.end(parent_run_id, parent_status(summary))
    there = len(chosen) - added
    echo(
        f"imported {spec.name}: {added} trials added or completed, {there} there already; "
        f"the study has {len(summary.trials)} of {summary.n_trials} trials "
        f"({summary.count(COMPLETED)} completed, {summary.count(DIVERGED)} diverged, "
        f"{summary.count(FAILED)} failed); MLflow {tracking.store_label(uri)}"
    )
    return 1 if refusals else 0


def study_spec(info: StudyInfo, name: str, path: Path) -> StudySpec:
    """The StudySpec the files were trained from, rebuilt from their resolved YAML (its hash
    checked), named `name`."""
    from study.spec import spec_from_mapping

    try:
        raw = yaml.safe_load(info.space_yaml)
        spec = spec_from_mapping(
            raw, name=name, where=info.source, base_iterations=info.base_iterations
        )
    except (yaml.YAMLError, ConfigError) as error:
        raise ResultError(f"{path}: study.space_yaml: {one_line(error)}") from None
    if spec.spec_hash() != info.space_hash:
        raise ResultError(
            f"{path}: damaged: its space_yaml hashes to {spec.spec_hash()}, not its "
            f"space_hash {info.space_hash}"
        )
    return replace(spec, smoke=info.smoke, overrides=info.overrides)


def _gather(folders: Sequence[Path]) -> list[tuple[Path, TrialRecord | None, str]]:
    """Every result file of the folders (or a file named itself), read: (path, record or None,
    the refusal)."""
    found: list[tuple[Path, TrialRecord | None, str]] = []
    for folder in folders:
        if folder.is_file():
            paths = [folder]
        elif folder.is_dir():
            paths = result_files(folder)
        else:
            raise ConfigError(f"{folder}: no such folder of result files")
        for path in paths:
            try:
                found.append((path, read_record(path), ""))
            except ResultError as error:
                found.append((path, None, str(error)))
    return found


def _check_planned(record: TrialRecord, plan: Plan, path: Path) -> None:
    """ResultError unless the trial is one of the plan's, with the plan's config."""
    if record.plan_gpu != plan.gpu:
        sized = f"for {record.plan_gpu.name}" if record.plan_gpu else "without a GPU"
        others = f"for {plan.gpu.name}" if plan.gpu else "without a GPU"
        raise ResultError(
            f"{path}: its packs (resources.pack: auto) were planned {sized}, the study's "
            f"{others}: train them with one --gpu"
        )
    planned = {trial.trial_id: trial for trial in plan.trials}
    trial = planned.get(record.trial_id)
    if trial is None:
        raise ResultError(f"{path}: trial {record.trial_id} is not in the study's plan")
    if not _same_trial(trial.config, record):
        raise ResultError(f"{path}: its config is not the plan's for {record.trial_id}")


def _same_trial(planned: TrialConfig, record: TrialRecord) -> bool:
    """The plan's config, or one that differs only in a precision that computed the same on
    the record's device: files written before `precision: auto` became the default say fp32,
    which auto is on a CPU (results/quick is such a study)."""
    if planned == record.config:
        return True
    alike = resolve_precision(planned.precision, record.device) == record.precision_used
    return alike and planned.replace(precision=record.config.precision) == record.config


def _keep_furthest(
    accepted: dict[str, tuple[Path, TrialRecord]], path: Path, record: TrialRecord
) -> None:
    """Of two files of one trial (trained twice), the finished one, else the longer curve."""
    held = accepted.get(record.trial_id)
    if held is None or (record.finished, record.last_iteration) > (
        held[1].finished,
        held[1].last_iteration,
    ):
        accepted[record.trial_id] = (path, record)
