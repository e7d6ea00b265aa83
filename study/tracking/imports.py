"""`study import`'s side of the store: a study's experiment, parent run and trial runs made from
result files exactly as `study run` makes them (the same Tracker and TrialRun calls), adding
nothing the store holds already."""

from __future__ import annotations

from pathlib import Path

from study.config import TrialConfig
from study.space import Plan
from study.tracking import STEP_KEY, StudyContext, Tags, Tracker, TrialRun
from study.tracking import trial_state as run_state
from study.tracking.tags import IMPORTED_TAG, parent_tags
from study.vocabulary import COMPLETED, DIVERGED, FAILED


def imported_parent_tags(plan: Plan, git_commit: str | None, version: str) -> Tags:
    """parent_tags(plan), but naming the code that trained the trials, not this checkout, and
    saying the study was made by `study import` (it has no Ray state for `study resume`)."""
    tags = {**parent_tags(plan), "study.version": version, IMPORTED_TAG: "true"}
    tags.pop("study.git_commit", None)
    if git_commit:
        tags["study.git_commit"] = git_commit
    return tags


def ensure_parent(
    tracker: Tracker, name: str, tags: Tags, spec_yaml: str, folder: Path
) -> tuple[str, bool]:
    """The study's parent run id, and whether it was created now (with its experiment, as
    `study run` creates them; `folder`: the --output)."""
    parent = tracker.find_parent(name)
    if parent is not None:
        return parent.run_id, False
    experiment_id = tracker.ensure_experiment(name, folder)
    return tracker.start_parent(experiment_id, name, tags, spec_yaml), True


def import_trial(
    tracker: Tracker,
    context: StudyContext,
    trial_id: str,
    config: TrialConfig,
    tags: Tags,
    curve: list[dict[str, float]],
    status: str,
    error: str = "",
) -> bool:
    """Log a trial trained elsewhere as its Ray trial would have: the same run, params, tags,
    metric history and outcome, through TrialRun. False, with nothing written, when the store
    holds the trial finished already, or in this state as far."""
    existing = tracker.find_trial(context.parent_run_id, trial_id)
    if existing is not None:
        held = run_state(existing.status, existing.tags)
        steps = [point.step for point in tracker.history(existing.run_id, STEP_KEY)]
        last = int(curve[-1]["iteration"]) if curve else -1
        if held in (COMPLETED, DIVERGED) or (held == status and max(steps, default=-1) >= last):
            return False
    run = TrialRun(tracker, context, trial_id, config, tags)
    run.set_tags(tags)  # a run found again gets them too, as a Ray trial's retry sets its own
    for point in curve:
        run.log(int(point["iteration"]), {k: v for k, v in point.items() if k != "iteration"})
    if status in (COMPLETED, DIVERGED):
        run.finish(status)
    elif status == FAILED:
        run.fail(error)
    return True
