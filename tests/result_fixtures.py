"""Result-file records for the tests of study/results.py and study/result_import.py."""

from __future__ import annotations

import math

from study.config import TrialConfig
from study.results import StudyInfo, TrialRecord


def info(**changes: object) -> StudyInfo:
    values = {
        "name": "s",
        "space_hash": "abc123abc123",
        "space_yaml": "task:\n  name: copying\n",
        "source": "s.yaml",
        "smoke": False,
        "overrides": (("fixed.lr", 0.01),),
        "base_iterations": 40,
    }
    values.update(changes)
    return StudyInfo(**values)  # type: ignore[arg-type]


def record(**changes: object) -> TrialRecord:
    values = {
        "study": info(),
        "trial_id": "t0001",
        "pack_id": "p0000",
        "pack_size": 2,
        "roles": {"method": "scientific", "seed": "replicate"},
        "config": TrialConfig(iterations=20, eval_every=10),
        "status": "diverged",
        "curve": [
            {"iteration": 10, "train/loss": 0.1 + 0.2, "val/accuracy": 1 / 3},
            {"iteration": 13, "train/loss": math.inf, "train/grad_norm": math.nan},
        ],
        "device": "cpu",
        "timings": {"seconds": 1.5},
        "command": "study trial --space s.yaml --out d",
        "machine": {"torch": "x"},
        "git_commit": "abc",
    }
    values.update(changes)
    return TrialRecord(**values)  # type: ignore[arg-type]
