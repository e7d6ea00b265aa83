"""The report's text helpers (study/analysis/text.py)."""

from __future__ import annotations

import math

from study.analysis.text import budget_text, markdown_table


def test_a_pipe_inside_a_cell_does_not_split_the_markdown_row():
    lines = markdown_table(["claim", "verdict"], [["h-detach | vanilla differ", "supported"]])
    assert lines == [
        "| claim | verdict |",
        "|---|---|",
        "| h-detach / vanilla differ | supported |",
    ]
    assert {line.count("|") for line in lines} == {3}


def test_an_unknown_budget_names_both_reasons_it_can_have():
    assert budget_text(math.nan) == (
        "budget unknown (the space fixes no iterations, or no trial has started)"
    )
    assert budget_text(0.004) == "budget 0.4% of the space file's iterations"


def test_a_budget_beyond_the_papers_reads_in_whole_percents():
    assert budget_text(1.0) == "budget 100% of the space file's iterations"
    assert budget_text(0.1234) == "budget 12.3% of the space file's iterations"
    assert budget_text(50.0) == "budget 5000% of the space file's iterations"  # not 5e+03%
