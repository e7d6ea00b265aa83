"""The trial-process side without Ray: which trials a Ray trial runs, and a pack's Tune result."""

from __future__ import annotations

import math
from types import SimpleNamespace

from study.config import TrialConfig
from study.runner.trainable import _pack_result, member_ids, members_of
from study.tracking import StudyContext

CONTEXT = StudyContext(
    name="s",
    tracking_uri="sqlite:////unused.db",
    parent_run_id="parent",
    roles={},
    metric="val/accuracy",
    mode="max",
    cpus=1.0,
    task_options=("T",),
    trial_states="/unused",
)


def test_members_of_a_trial_a_pack_and_an_optuna_sample() -> None:
    base = TrialConfig(method="h_detach", p_detach=0.25, task_options={"T": 5}).to_dict()
    solo = {"study": CONTEXT.to_dict(), "trial": {"config": base, "point": {}}}
    assert [(t, c.p_detach, tags) for t, c, tags in members_of(solo, "t0003")] == [
        ("t0003", 0.25, {})
    ]
    assert member_ids(solo, "t0003") == ["t0003"]
    pack = {
        "study": CONTEXT.to_dict(),
        "pack": {"id": "p0001", "size": 3, "members": [{"id": "t0004", "config": base}]},
    }
    ((trial_id, _, tags),) = members_of(pack, "p0001")
    assert trial_id == "t0004" and tags == {"study.pack": "p0001", "study.pack_size": "3"}
    assert member_ids(pack, "p0001") == ["t0004"]
    # An Optuna sample: the sampled task option goes into task_options.
    sample = {**solo, "nuisance": {"lr": 0.01, "T": 7}}
    ((_, config, _),) = members_of(sample, "t0005")
    assert (config.lr, config.task_options["T"]) == (0.01, 7)


def test_a_packs_result_is_its_best_member_and_each_members_own() -> None:
    def member(trial_id: str, status: str, accuracy: float) -> SimpleNamespace:
        latest = {"val/accuracy": accuracy}
        result = {"val/accuracy": accuracy, "iteration": 20, "outcome": status}
        return SimpleNamespace(
            trial_id=trial_id,
            metric="val/accuracy",
            latest=latest,
            status=status,
            iteration=20,
            result=lambda: result,
        )

    members = [member("t0000", "completed", 0.5), member("t0001", "diverged", math.nan)]
    result = _pack_result(members, "max")  # type: ignore[arg-type]
    assert (result["val/accuracy"], result["outcome"], result["iteration"]) == (
        0.5,
        "completed",
        20,
    )
    assert result["t0001/outcome"] == "diverged"
    running = [member("t0000", "running", 0.4), member("t0001", "completed", 0.6)]
    assert _pack_result(running, "min")["outcome"] == "running"  # type: ignore[arg-type]
    assert _pack_result(running, "min")["val/accuracy"] == 0.4  # type: ignore[arg-type]
