"""A random search's draws (study/random_search.py): distinct, and never more than the
nuisance axes hold, as the plan's trials (study.space) get them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import tiny_copying, write_space

from study import space
from study.errors import ConfigError
from study.random_search import MAX_REDRAWS
from study.spec import load_spec


def test_random_draws_are_distinct_and_never_more_than_the_lists_hold(tmp_path: Path) -> None:
    """A repeated draw was dropped as a duplicate trial: a cell got fewer samples than asked."""
    lists = {"nuisance": {"lr": [0.01, 0.02, 0.03]}}
    for samples in (2, 3):
        body = tiny_copying(search={"searcher": "random", "samples_per_cell": samples}, **lists)
        plan = space.make_plan(load_spec(write_space(tmp_path, f"r{samples}", body)))
        assert plan.n_trials == samples * 2 * 2  # 2 methods x 2 seeds
        assert len({t.config.lr for t in plan.trials}) == samples
    body = tiny_copying(search={"searcher": "random", "samples_per_cell": 4}, **lists)
    with pytest.raises(ConfigError, match=r"field search.samples_per_cell: 4 draws, but the "
                       r"nuisance axes hold 3 distinct points"):  # fmt: skip
        space.make_plan(load_spec(write_space(tmp_path, "r4", body)))
    # An integer range draws whole numbers: 2 of them here, never 3 (the redraw spun forever).
    whole = {"nuisance": {"batch_size": {"min": 50, "max": 51}}}
    body = tiny_copying(search={"searcher": "random", "samples_per_cell": 3}, **whole)
    with pytest.raises(ConfigError, match=r"3 draws, but the nuisance axes hold 2 distinct"):
        space.make_plan(load_spec(write_space(tmp_path, "int3", body)))


def test_a_search_that_finds_no_new_point_says_so_instead_of_spinning(tmp_path: Path) -> None:
    """A float range has no count of values: 1000 redraws that never give a new point end it."""
    one_ulp = {"min": 1.0e-3, "max": math.nextafter(1.0e-3, 1.0), "scaling": "linear"}
    body = tiny_copying(search={"searcher": "random", "samples_per_cell": 3},
                        nuisance={"lr": one_ulp})  # fmt: skip
    with pytest.raises(ConfigError, match=rf"no new point in {MAX_REDRAWS} draws after 2"):
        space.make_plan(load_spec(write_space(tmp_path, "narrow", body)))
