"""benchmarks/sweep_verdicts.py: issue 18's targets read from a Sweep (met, MISSED, not
measured), the whole paper study priced from a table, and the estimate check's verdict."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from bench_modules import benchmark_module

from study import costs

TARGET = "issue 18 target: "


@pytest.fixture(scope="module")
def verdicts():
    return benchmark_module("sweep_verdicts")


@pytest.fixture(scope="module")
def table():
    return benchmark_module("sweep_table")


def _sweep(table, shapes=("copying", "pixel_mnist"), device: str = "cuda"):
    args = argparse.Namespace(device=device, shapes=list(shapes), check_iterations=100)
    return table.Sweep(args, "NVIDIA H200", 132, "2.11")


def test_the_per_shape_targets(verdicts, table) -> None:
    sweep = _sweep(table)
    sweep.cudnn |= {"copying": 2.0, "pixel_mnist": 5.0}
    point = table.Point
    sweep.packs[point("copying", "tf32", 1)] = {"ms": 1.5, "kernel": "Triton split"}
    sweep.packs[point("copying", "tf32", 16, auto=True)] = {"ms": 3.2, "kernel": "Triton split"}
    sweep.packs[point("pixel_mnist", "fp32", 18)] = {"ms": 18.0, "kernel": "Triton split"}
    lines = verdicts.verdicts(sweep)
    assert lines == [
        # 3.2 / 16 = 0.2 ms a trial, 0.1 of cuDNN's 2.0: met at the bound.
        f"{TARGET}best per-trial step <= 0.1 x cuDNN step at copying: 0.100 met (K=16, tf32, "
        "Triton split)",
        f"{TARGET}single trial tf32 <= 1.0 x cuDNN step at copying: 0.750 met (Triton split)",
        f"{TARGET}best per-trial step <= 0.1 x cuDNN step at pixel_mnist: 0.200 MISSED (K=18, "
        "fp32, Triton split)",
        f"{TARGET}single trial tf32 <= 1.0 x cuDNN step at pixel_mnist: not measured",
    ]
    sweep.cudnn.pop("copying")
    assert verdicts.verdicts(sweep)[:2] == [
        f"{TARGET}best per-trial step <= 0.1 x cuDNN step at copying: not measured",
        f"{TARGET}single trial tf32 <= 1.0 x cuDNN step at copying: not measured",
    ]


def _paper_table(folder: Path, ms: float, shapes: tuple[str, ...]) -> Path:
    """An H200 cost table in the contract: ms per pack step at every pack size 1..18 (flat),
    tf32, for the sweep's paper shapes named."""
    sizes = {"copying": (120, 128, 100), "pixel_mnist": (784, 100, 100)}
    entries = [
        {
            "shape": shape,
            "steps": sizes[shape][0],
            "hidden": sizes[shape][1],
            "batch": sizes[shape][2],
            "members": members,
            "precision": "tf32",
            "kernel": "Triton split",
            "ms_per_pack_step": ms,
            "ms_per_trial_step": ms / members,
            "cudnn_step_ms": None,
            "eval_ms_per_pack_batch": None,
        }
        for shape in shapes
        for members in (1, 18)
    ]
    fields = dict.fromkeys(costs.TABLE_FIELDS, "test") | {"gpu": "h200", "sms": 132}
    path = folder / "h200.json"
    path.write_text(json.dumps(fields | {"measured_on": "2026-12-03", "entries": entries}))
    return path


def test_the_whole_paper_study_target_reads_the_table_just_written(
    verdicts, table, tmp_path: Path
) -> None:
    sweep = _sweep(table)
    both = ("copying", "pixel_mnist")
    # 0.1 ms a pack step: copying T=100 2 packs x 600,000 its (120 s), T=300 one scaled by
    # 320/120 steps (160 s), pixel and permuted MNIST 9 packs x 100,000 its (90 s): 370 s.
    lines = verdicts.whole_study(sweep, [_paper_table(tmp_path, 0.1, both)])
    target = f"{TARGET}whole paper study <= 1 GPU-hour on h200: "
    assert lines[0] == (
        f"{target}0.10 h met (6 min of GPU time (training steps only) for 165 of 165 trials in "
        "12 of 12 packs)"
    )
    assert lines[1].splitlines()[1].startswith("all 8 studies: 6 min")
    slow = verdicts.whole_study(sweep, [_paper_table(tmp_path, 10.0, both)])
    assert slow[0].startswith(f"{target}10.28 h MISSED")
    # A shape the run did not measure: no verdict, and why.
    copying_only = verdicts.whole_study(sweep, [_paper_table(tmp_path, 0.1, ("copying",))])
    assert copying_only[0].startswith(f"{target}not measured: 45 of 165 trials priced; h200.json")
    unwritten = verdicts.whole_study(sweep, [tmp_path / "elsewhere" / "h100.json"])
    assert unwritten == [f"{target}not measured (no --table written for h200)"]


def test_the_estimate_check_passes_within_15_percent_and_says_why(
    verdicts, table, tmp_path: Path
) -> None:
    sweep = _sweep(table, shapes=("tiny",), device="cpu")
    point = table.Point("tiny", "fp32", 2)
    sweep.packs[point] = {"ms": 10.0, "kernel": "per-step", "start_ms": 500.0}
    sweep.eval_member[("tiny", "fp32")] = 50.0
    # Priced from this run's entry (no table written): 0.5 s + 100 x 10 ms + 2 x 50 ms = 1.6 s.
    answer = {"seconds": [1.7, 2.8], "statuses": [["completed"]], "kernel": "per-step"}
    lines = verdicts.estimate_check_lines(sweep, point, answer, [])
    assert (
        "estimated 1.600 s = 500.0 ms (start-up) + 100 x 10.00 ms (step) + 1 x 100.0 ms"
        in (lines[0])
    )
    assert lines[0].endswith("from this run's entry; ratio 1.062: PASS (within 15%)")
    # The doubled run: (2.8 - 1.7 - 0.1) / 100 = 10 ms a step; 1.7 - 1.0 - 0.1 = 0.6 s fixed.
    assert "10.00 ms per step beyond the first 100 (table 10.00) and 0.600 s per run" in lines[1]
    slow = verdicts.estimate_check_lines(sweep, point, answer | {"seconds": [2.0, 3.0]}, [])
    assert "ratio 1.250: FAIL (within 15%)" in slow[0]
    failed = verdicts.estimate_check_lines(sweep, point, {"error": "ChildLost: no answer"}, [])
    assert failed == [
        "estimate check (tiny, pack of 2, fp32, train_packed for 100 iterations + 1 evaluation): "
        "FAILED to run: ChildLost: no answer"
    ]
    # A table written for this device is read through study.costs, as `study plan` reads it.
    sweep.cudnn["tiny"] = 20.0
    path = tmp_path / "cpu.json"
    table.write_tables(sweep, [path], "abc1234")
    from_table = verdicts.estimate_check_lines(sweep, point, answer, [path])
    assert "from study.costs, cpu.json; ratio 1.062: PASS" in from_table[0]
    assert costs.load_table("cpu", tmp_path).entries
