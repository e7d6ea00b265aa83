"""What a stopped session (Ctrl-C, SIGTERM) leaves in MLflow: every trial run it left RUNNING
ends, FINISHED as its trial last reported, or KILLED (interrupted: `study resume` continues it)."""

from __future__ import annotations

from study.tracking import Tracker
from study.vocabulary import COMPLETED, DIVERGED


def close_unfinished(tracker: Tracker, name: str, outcomes: dict[str, str | None]) -> int:
    """End the study's trial runs still RUNNING once its Tuners returned: their processes are
    gone (Tune stops them on Ctrl-C), and a run left RUNNING would read as live in the UI for
    ever. A trial whose last result Tune heard (`outcomes`, by trial id) says completed or
    diverged was stopped between that result and its run's end: FINISHED with that outcome.
    Returns how many runs it ended."""
    parent = tracker.find_parent(name)
    if parent is None:
        return 0
    mlflow = tracker._mlflow
    ended = 0
    for run in tracker.trials(parent):
        if run.status != "RUNNING":
            continue
        outcome = outcomes.get(run.tags.get("study.trial_id", ""))
        if outcome in (COMPLETED, DIVERGED):
            mlflow.set_tag(run.run_id, "outcome", outcome)
            mlflow.set_terminated(run.run_id, status="FINISHED")
        else:
            mlflow.set_terminated(run.run_id, status="KILLED")
        ended += 1
    return ended
