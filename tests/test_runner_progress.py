"""The console lines of a running study, and the Tune callback that prints them."""

from __future__ import annotations

import pickle

from ray.tune.experiment import Trial

from study.runner.progress import ConsoleProgress, ProgressCallback


def test_a_trial_finished_in_an_earlier_session_is_not_printed_again() -> None:
    # After a killed driver, Tune's snapshot can predate t0000's completion: on resume Tune runs
    # it again, it returns at once, and Tune ends it with the snapshot's last result (running).
    printed: list[str] = []
    before = {"t0000", "t0001"}
    reporter = ConsoleProgress(None, "", 4, before, before, printed.append)  # type: ignore[arg-type]
    results = {
        "t0000": {"outcome": "running", "best/val_accuracy": 0.139, "time_total_s": 9.0},
        "t0002": {"outcome": "completed", "best/val_accuracy": 0.186, "time_total_s": 12.0},
    }
    for trial_id, result in results.items():
        trial = Trial(
            "__fake",
            config={"trial": {"point": {"method": "none", "seed": 0}}},
            trial_id=trial_id,
            stub=True,
            trial_name_creator=lambda trial: trial.trial_id,
        )
        trial.run_metadata.last_result = result
        reporter.lines(trial)
    assert printed == ["[3/4] t0002 none seed=0: completed, best val/accuracy 0.186 (12 s)"]


def test_the_callback_pickles_without_its_sessions_printer() -> None:
    # Tune pickles callbacks with the experiment (tuner.pkl): a restored one must not print
    # through an earlier session's echo; the restoring session hands it its own printer.
    printed: list[str] = []
    progress = ConsoleProgress(None, "", 1, set(), set(), printed.append)  # type: ignore[arg-type]
    restored = pickle.loads(pickle.dumps(ProgressCallback(progress)))
    assert isinstance(restored, ProgressCallback) and restored.progress is None
    restored.on_trial_complete(0, [], object())  # no printer: nothing to do, no error
    assert printed == []
