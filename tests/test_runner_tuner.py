"""Tune assembly without running Tune: the grid of trials or packs left to run, trial names."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from conftest import tiny_copying, write_space

from study import space
from study.runner.tuner import TrialNamer, _grid_points
from study.spec import load_spec


def test_the_grid_leaves_out_finished_trials_and_empty_packs(tmp_path: Path) -> None:
    spec = load_spec(write_space(tmp_path, "solo", tiny_copying()))
    axis, points = _grid_points(space.make_plan(spec), {"t0001"})
    assert axis == "trial" and [p["id"] for p in points] == ["t0000", "t0002", "t0003"]
    assert points[0]["point"] == {"method": "none", "p_detach": 0.0, "seed": 0}
    packed = load_spec(write_space(tmp_path, "packed", tiny_copying(resources={"pack": 2})))
    axis, points = _grid_points(space.make_plan(packed), {"t0000", "t0001"})
    assert axis == "pack"
    assert [(p["id"], p["size"], [m["id"] for m in p["members"]]) for p in points] == [
        ("p0001", 2, ["t0002", "t0003"])
    ]


def test_ray_trials_are_named_by_our_ids() -> None:
    grid = SimpleNamespace(config={"trial": {"id": "t0007"}})
    pack = SimpleNamespace(config={"pack": {"id": "p0003"}})
    assert TrialNamer()(grid) == "t0007" and TrialNamer()(pack) == "p0003"
    # An Optuna cell whose first trial is t0006: Tune's 1-based sample counter follows it.
    sample = SimpleNamespace(config={}, experiment_tag="2_lr=0.01")
    assert TrialNamer(6)(sample) == "t0007"
