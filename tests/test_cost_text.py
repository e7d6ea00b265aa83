"""What `study plan --estimate` prints (study/cost_text.py): one study's lines, and the total of
several studies with the table's lines once."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_copying, write_space
from cost_fixtures import entry, small_plan, table_json, write_table

from study import cost_text, costs
from study.space import make_plan
from study.spec import load_spec


def test_estimate_text_lines(tmp_path: Path) -> None:
    started = [entry(1, 2.0, start_ms=400.0), entry(4, 5.0, start_ms=1000.0), entry(8, 9.0)]
    write_table(tmp_path, table_json(entries=started))
    lines = cost_text.estimate_text(small_plan(tmp_path, 4), "h200", tmp_path).splitlines()
    assert lines[0] == (
        "GPU h200: Test GPU, cost table h200.json measured 2026-12-01 at abc1234 (torch 2.14.1)"
    )
    assert lines[1] == (
        "estimate: 1.0 h of GPU time (training, evaluation and pack start-up) for 4 of 4 trials "
        "in 1 of 1 pack"
    )
    assert lines[2] == (
        "  copying 25 steps H=8 B=10 auto (as tf32): 1 pack of 4 x 720,000 its x 5.00 ms "
        "(1.25 ms per trial-step, 0.31x cuDNN) = 1.0 h"
    )
    three = cost_text.estimate_text(small_plan(tmp_path, 3), "h200", tmp_path).splitlines()
    assert three[2].endswith("= 48 min [interpolated between packs of 1 and 4]")  # 4 ms x 720k
    assert lines[3] == (
        "  pack start-up included: 1 s in all (members built, kernels loaded, CUDA graph captured)"
    )
    assert "not included" not in "\n".join(lines)
    assert lines[-2].endswith("; not counted: each pack's process start and data loading")
    assert lines[-1] == "  table source: benchmarks/pack_sweep.py"
    # Packs of 3 and 1, where only the pack of 1 has a start-up measured: the pack of 3 (between
    # 1 and 4) has none, so the total does not claim to hold start-up.
    write_table(tmp_path, table_json(entries=[entry(1, 2.0, start_ms=400.0), entry(4, 5.0)]))
    three = cost_text.estimate_text(small_plan(tmp_path, 3), "h200", tmp_path).splitlines()
    assert "(training and evaluation)" in three[1]
    assert "  pack start-up not included for 1 pack: the table has no start_ms there" in three


def test_several_studies_print_their_total_and_the_table_once(tmp_path: Path) -> None:
    write_table(tmp_path, table_json())
    four = costs.estimate(small_plan(tmp_path, 4), "h200", tmp_path)  # 1.0 h, priced whole
    body = tiny_copying(
        fixed={"iterations": 600, "eval_every": 100, "device": "auto"}, resources={"pack": 9}
    )
    body["replicates"] = {"seeds": 5}  # a pack of 9 the table cannot price, and one of 1
    big = costs.estimate(
        make_plan(load_spec(write_space(tmp_path, "big", body))), "h200", tmp_path
    )
    both = costs.Studies((four, big))  # their numbers: tests/test_costs.py
    lines = cost_text.studies_text(both).splitlines()
    assert lines[0].startswith("GPU h200: Test GPU, cost table h200.json")
    assert lines[1] == (
        "all 2 studies: 1.0 h of GPU time (training and evaluation) for 5 of 14 trials in 2 of "
        "3 packs (a lower bound: not every trial could be estimated)"
    )
    assert lines[2] == "  small    1.0 h  4 of 4 trials in 1 of 1 pack"
    assert lines[3] == "  big        1 s  1 of 10 trials in 1 of 2 packs; not estimated: 9"
    assert lines[-1] == "  table source: benchmarks/pack_sweep.py"
    # Each study's own lines leave the table's to the total.
    alone = cost_text.describe(four).splitlines()
    assert cost_text.describe(four, alone=False).splitlines() == alone[1:-2]


def test_durations_read_in_the_unit_that_suits_them() -> None:
    assert [cost_text.format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 37000)] == [
        "0 s",
        "59 s",
        "1 min",
        "60 min",
        "1.0 h",
        "10.3 h",
    ]
