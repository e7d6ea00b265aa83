"""Figures: every seed's curve is drawn, every figure renders to a PNG."""

from __future__ import annotations

import numpy as np
from analysis_fixtures import grid, make_trial
from matplotlib.lines import Line2D

from study.analysis.figures import (
    all_figures,
    curves_figure,
    expected_best_figure,
    png_bytes,
    success_heatmap_figure,
)
from study.analysis.load import Study
from study.analysis.stats import analyse

GOOD = [0.5, 0.995]
BAD = [0.4, 0.6]


def _analysis():
    cells = {(lr, clip): [GOOD, GOOD, BAD] for lr in (1e-3, 1e-2) for clip in (1.0, None)}
    trials = grid({("none", 0.0): cells, ("h_detach", 0.5): cells})
    trials.append(make_trial("t9000", [0.3], seed=3, state="running"))
    trials.append(make_trial("t9001", [0.1], seed=4, state="failed", error="boom"))
    return analyse(Study("s", "sqlite:///x", "p", len(trials) + 2, 0.99, trials))


def _seed_lines(ax) -> list[Line2D]:
    # Curves have one point per evaluation; the target line is an axhline, the cross a marker.
    return [line for line in ax.get_lines() if line.get_label().startswith("seed")]


def test_curves_have_one_line_per_seed_in_every_panel():
    analysis = _analysis()
    figure = curves_figure(analysis, "copying T=100")
    panels = [ax for ax in figure.axes if ax.get_title()]
    # Rows: 2 lrs x 2 clips; columns: vanilla and h-detach.
    assert len(panels) == 8
    for ax in panels:
        expected = 5 if ax.get_title() == "vanilla, lr=0.001, clip=1" else 3
        assert len(_seed_lines(ax)) == expected, ax.get_title()
    running = [ax for ax in panels if ax.get_title() == "vanilla, lr=0.001, clip=1"][0]
    labels = [line.get_label() for line in _seed_lines(running)]
    # Every trial of the plan is drawn: the failed one too, dotted up to where it failed.
    assert "seed 3 (running)" in labels and "seed 4 (failed)" in labels
    failed = [line for line in _seed_lines(running) if line.get_label() == "seed 4 (failed)"]
    assert failed[0].get_linestyle() == ":"


def test_a_planned_method_with_no_trial_started_has_its_column():
    trials = grid({("none", 0.0): {(1e-3, 1.0): [GOOD] * 3}})
    study = Study("s", "sqlite:///x", "p", 6, 0.99, trials,
                  planned_variants=(("none", 0.0), ("h_detach", 0.25)))  # fmt: skip
    figure = curves_figure(analyse(study), "copying T=100")
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["vanilla, lr=0.001, clip=1", "h-detach p=0.25, lr=0.001, clip=1"]
    empty = figure.axes[1]
    assert not _seed_lines(empty) and [t.get_text() for t in empty.texts] == ["no trial started"]


def test_heatmap_annotates_success_counts():
    figure = success_heatmap_figure(_analysis(), "copying T=100")
    texts = [t.get_text() for ax in figure.axes for t in ax.texts]
    # 2 methods x 4 cells, each 2 of 3 seeds reaching the target.
    assert texts.count("2/3") == 8


def test_expected_best_curve_per_method():
    figure = expected_best_figure(_analysis(), "copying T=100")
    (ax,) = figure.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["vanilla", "h-detach p=0.5"]
    # 12 finished runs each: best accuracies eight 0.995 and four 0.6; n = 1 is their mean.
    np.testing.assert_allclose(lines[0].get_ydata()[0], (8 * 0.995 + 4 * 0.6) / 12)


def test_all_figures_are_pngs():
    figures = all_figures(_analysis())
    assert sorted(figures) == [
        "copying_T_100_curves.png",
        "copying_T_100_expected_best.png",
        "copying_T_100_lr_sensitivity.png",
        "copying_T_100_success_heatmap.png",
    ]
    for figure in figures.values():
        png = png_bytes(figure)
        assert png.startswith(b"\x89PNG") and len(png) > 5_000
