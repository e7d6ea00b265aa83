"""Seed-aggregated curves per cell: quantiles over the seeds that logged each step."""

from __future__ import annotations

import numpy as np
from analysis_fixtures import make_trial

from study.analysis.cell_curves import aggregate, cells_of


def test_quantiles_are_over_the_seeds_that_logged_each_step():
    curve = aggregate(
        "train/loss",
        [
            (np.array([100, 200, 300]), np.array([3.0, 2.0, 1.0])),
            (np.array([100, 200, 300]), np.array([5.0, 4.0, 3.0])),
            (np.array([100, 200]), np.array([7.0, np.nan])),  # diverged at 200: left out
        ],
    )
    assert curve.steps.tolist() == [100, 200, 300]
    assert curve.seeds.tolist() == [3, 2, 2]
    assert curve.quantiles["median"].tolist() == [5.0, 3.0, 2.0]
    assert curve.quantiles["q25"].tolist() == [4.0, 2.5, 1.5]
    assert curve.quantiles["q75"].tolist() == [6.0, 3.5, 2.5]


def test_cells_group_finished_trials_by_cell_and_name_them():
    trials = [
        make_trial("t0", [0.1, 0.2], method="h_detach", p_detach=0.25, seed=0),
        make_trial("t1", [0.1, 0.3], method="h_detach", p_detach=0.25, seed=1),
        make_trial("t2", [0.1, 0.3], seed=0),
        make_trial("t3", [0.1], seed=1, state="failed"),
    ]
    cells = cells_of(trials)
    names = [cell.name for cell, _ in cells]
    assert names == [
        "copying T=100 | h-detach p=0.25 | lr=0.001 | clip=1",
        "copying T=100 | vanilla | lr=0.001 | clip=1",
    ]
    assert [cell.trial_ids for cell, _ in cells] == [("t0", "t1"), ("t2",)]
    assert cells[0][0].params["seeds"] == "2" and len(cells[0][1]) == 2
