"""benchmarks/sweep_table.py: what a sweep measured and the cost table written from it: GPU
names, where tables go, which pack sizes a shape gets (auto included), the layout each would
run, and the table a Sweep writes, read back by study.costs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from bench_modules import benchmark_module

from study import costs


@pytest.fixture(scope="module")
def table():
    return benchmark_module("sweep_table")


def _sweep(table, device: str = "cuda", members: tuple[str, ...] = ("1", "16", "auto")):
    args = argparse.Namespace(device=device, members=list(members))
    return table.Sweep(args, "NVIDIA H200" if device == "cuda" else "CPU", 132, "2.11")


def test_gpu_keys_and_table_paths(table, tmp_path: Path) -> None:
    assert table.gpu_key("NVIDIA H200") == "h200"
    assert table.gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert table.gpu_key("NVIDIA GeForce RTX 4090") == "nvidiageforcertx4090"
    file, folder = str(tmp_path / "x.json"), str(tmp_path / "out")
    paths = table.table_paths([file, folder], "h200", cuda=True)
    assert paths == [tmp_path / "x.json", tmp_path / "out" / "h200.json"]
    assert table.table_paths(None, "h200", cuda=True)[0].parts[-3:] == (
        "benchmarks",
        "results",
        "h200.json",
    )
    assert table.table_paths(None, "cpu", cuda=False) == []


def test_auto_is_the_resident_pack_of_the_shape_and_precision(table, monkeypatch) -> None:
    monkeypatch.delenv("HDETACH_TRITON_SPLIT_ROWS", raising=False)
    monkeypatch.delenv("HDETACH_TRITON_KERNEL", raising=False)
    sweep = _sweep(table)
    # tf32 takes 128 rows a program: 7 programs a pixel-MNIST trial, 18 trials on 132 SMs.
    assert table.sizes(sweep, "pixel_mnist", "tf32") == [(1, False), (16, False), (18, True)]
    # Full fp32 compiles only up to 32 rows a program: fewer trials fit.
    fp32 = table.sizes(sweep, "pixel_mnist", "fp32")
    assert [k for k, auto in fp32 if auto] == [4]
    # A listed K equal to auto is measured once, labelled auto.
    copying = table.sizes(_sweep(table, members=("16", "auto")), "copying", "tf32")
    assert copying == [(16, True)]
    assert table.predicted_layout(sweep, "pixel_mnist", 18, "tf32") == "128x16 126/132"
    assert table.predicted_layout(sweep, "pixel_mnist", 64, "tf32") == "none fits"
    monkeypatch.setenv("HDETACH_TRITON_SPLIT_ROWS", "16")
    assert table.predicted_layout(sweep, "pixel_mnist", 18, "tf32") == "forced 16 rows"
    assert table.predicted_layout(_sweep(table, "cpu", ("1",)), "tiny", 1, "fp32") == "-"


def test_a_sweep_writes_the_cost_table_that_study_costs_reads(table, tmp_path: Path) -> None:
    sweep = _sweep(table, "cpu", ("1", "2"))
    sweep.packs[table.Point("tiny", "fp32", 2)] = {"ms": 3.0, "kernel": "per-step"}
    sweep.packs[table.Point("tiny", "fp32", 1)] = {"ms": 2.0, "kernel": "per-step", "start_ms": 9}
    sweep.cudnn["tiny"] = 4.0
    sweep.eval_member[("tiny", "fp32")] = 0.5
    path = tmp_path / "cpu.json"
    assert table.table_paths([str(tmp_path)], sweep.gpu, sweep.cuda) == [path]
    table.write_tables(sweep, [path], "abc1234")
    raw = json.loads(path.read_text())
    assert set(raw) == {*costs.TABLE_FIELDS, "entries"} and raw["commit"] == "abc1234"
    assert not list(tmp_path.glob("*.partial"))  # written whole, then moved into place
    first, second = raw["entries"]  # in order of K, whatever order they were measured in
    assert (first["members"], first["ms_per_trial_step"], first["start_ms"]) == (1, 2.0, 9)
    assert (second["members"], second["ms_per_trial_step"], second["start_ms"]) == (2, 1.5, None)
    assert second["eval_ms_per_pack_batch"] == 1.0 and second["cudnn_step_ms"] == 4.0
    read = costs.load_table("cpu", tmp_path)
    assert costs.step_ms(read, steps=5, hidden=16, batch=8, members=2, precision="fp32") == 3.0


def test_a_sweep_with_nothing_measured_writes_no_table(table, tmp_path: Path) -> None:
    table.write_tables(_sweep(table, "cpu", ("1",)), [tmp_path / "cpu.json"], "abc1234")
    assert not list(tmp_path.iterdir())
