"""The console's view of a running study: one line per finished trial (each member of a pack),
numbered across sessions, printed from Tune's callbacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune

from study import console
from study.errors import one_line
from study.runner.trainable import member_ids
from study.tracking import Tracker
from study.vocabulary import COMPLETED, DIVERGED, FAILED, RUNNING

Echo = Callable[[str], None]


class ConsoleProgress:
    """Prints one line per finished trial (each member of a pack), numbered across sessions."""

    def __init__(
        self,
        tracker: Tracker,
        parent_run_id: str,
        total: int,
        finished: set[str],
        done: set[str],
        echo: Echo,
    ) -> None:
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.total = total
        self.finished = set(finished)
        # Trials that completed or diverged in an earlier session: Tune may run them (or their
        # pack, for its other members) again, and they must not be printed twice.
        self.done_before = set(done)
        self.echo = echo

    def error(self, trial: Any) -> str:
        """The error the trial (a pack: its first member that has one) recorded in MLflow
        itself, else the one Ray kept."""
        for trial_id in member_ids(trial.config, str(trial)):
            run = self.tracker.find_trial(self.parent_run_id, trial_id)
            if run is not None and run.tags.get("error"):
                return run.tags["error"]
        return _trial_error(trial)

    def retrying(self, trial: Any) -> None:
        self.echo(f"      {trial}: retrying after {console.shorten(self.error(trial))}")

    def lines(self, trial: Any, error: str | None = None) -> None:
        """The lines of a Ray trial that ended: completed, or failed with `error`."""
        result = trial.last_result or {}
        if "pack" not in trial.config:
            if str(trial) in self.done_before:
                # It finished in an earlier session, after Tune's last snapshot: Tune runs it
                # again, it returns at once (its saved state says finished), and Tune ends it
                # with the snapshot's stale last result. Its line was printed back then.
                return
            outcome = result.get("outcome", COMPLETED) if error is None else FAILED
            point = {**trial.config["trial"]["point"], **trial.config.get("nuisance", {})}
            self._line(str(trial), point, outcome, result.get("best/val_accuracy"), result, error)
            return
        for member in trial.config["pack"]["members"]:
            trial_id = member["id"]
            if trial_id in self.done_before:
                continue
            outcome = result.get(f"{trial_id}/outcome", COMPLETED if error is None else RUNNING)
            if error is not None and outcome not in (COMPLETED, DIVERGED):
                outcome = FAILED  # the pack failed while this member was running
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


class ProgressCallback(tune.Callback):
    """Tune's hooks, printing through this session's ConsoleProgress.

    Tune pickles its callbacks with the experiment (tuner.pkl) and restores those on resume:
    this one pickles without its printer (whose echo and store belong to one session), and the
    session that restores it hands it its own (tuner.restored).
    """

    def __init__(self, progress: ConsoleProgress | None = None) -> None:
        self.progress = progress

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (ProgressCallback, ())

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.lines(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.lines(trial, self.progress.error(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.retrying(trial)


def _trial_error(trial: Any) -> str:
    try:
        error = trial.get_pickled_error()
    except Exception:  # the error file may be unreadable; the MLflow run still has the error
        error = None
    if error is None:
        return "error (see the trial's error.txt)"
    # A RayTaskError wraps the trainable's own exception, which is the one worth a line.
    return one_line(getattr(error, "cause", None) or error)
