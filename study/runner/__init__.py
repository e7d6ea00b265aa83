"""Ray Tune runs a study here, and only here: `driver` (run, resume), `trainable` (the trial
process), `tuner`, `progress` (console lines), `preflight`, `state` (study.json), `session`."""

from study.runner.driver import resume_study, run_study

__all__ = ["resume_study", "run_study"]
