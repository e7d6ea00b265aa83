"""The report's verdict lines on synthetic studies (study/analysis/verdicts.py)."""

from __future__ import annotations

from analysis_fixtures import grid

from study.analysis.load import Study
from study.analysis.stats import analyse
from study.analysis.verdicts import verdicts

LRS = (1e-4, 1e-3, 1e-2)


def _verdict_lines(curves) -> list[str]:
    trials = grid(curves)
    return verdicts(analyse(Study("s", "sqlite:///x", "parent", len(trials), 0.99, trials)))


def test_the_good_lr_line_names_a_method_short_of_data_instead_of_dropping_it():
    # Vanilla: 3 seeds at each lr. h-detach: 3 seeds at one lr, 2 at the others.
    curves = {
        ("none", 0.0): {(lr, 1.0): [[0.9]] * 3 for lr in LRS},
        ("h_detach", 0.25): {(lr, 1.0): [[0.9]] * (3 if lr == LRS[0] else 2) for lr in LRS},
    }
    (line,) = [line for line in _verdict_lines(curves) if "good-lr range" in line]
    assert "vanilla 2.0 decades (lr 0.0001 to 0.01 of 3 lrs)" in line
    assert "h-detach p=0.25 not enough data (fewer than 2 lrs with 3 seeds)" in line


def test_the_good_lr_line_without_any_method_with_data_says_so_once():
    curves = {("none", 0.0): {(lr, 1.0): [[0.9]] * 2 for lr in LRS}}
    (line,) = [line for line in _verdict_lines(curves) if "good-lr range" in line]
    assert line.endswith(": not enough data (fewer than 2 lrs with 3 seeds).")


def test_a_planned_method_with_no_finished_run_is_named_in_every_line():
    """Only vanilla has finished (h-detach's trials are pending or running): its lines say
    "not enough data", and the IQM, whose cells need every method, has none for vanilla either."""
    trials = grid({("none", 0.0): {(1e-3, 1.0): [[0.9]] * 3}})
    study = Study("s", "sqlite:///x", "parent", 6, 0.99, trials,
                  planned_variants=(("h_detach", 0.25), ("none", 0.0)))  # fmt: skip
    lines = verdicts(analyse(study))
    (best,) = [line for line in lines if "each method at its best" in line]
    assert "h-detach p=0.25: not enough data" in best
    assert any("h-detach p=0.25 vs vanilla: not enough data" in line for line in lines), lines
    (iqm,) = [line for line in lines if "IQM" in line]
    assert iqm.endswith("vanilla not enough data; h-detach p=0.25 not enough data."), iqm
