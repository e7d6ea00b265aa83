"""Result files: written and read back exactly, strict JSON, and every unusable file one line
naming it (damaged, unknown format version, misnamed, of another study or space); the
precision a trial used and the GPU its packs were sized for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from result_fixtures import record

from study import results
from study.config import TrialConfig
from study.pack_layout import KNOWN_GPUS
from study.results import ResultError

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "search_spaces" / "quick.yaml"
STUDY_JSON = record().study.to_json()


def test_a_record_reads_back_exactly_from_strict_json(tmp_path: Path) -> None:
    written = record()
    path = results.write_record(tmp_path, written)
    assert path == tmp_path / "t0001.json" and list(tmp_path.iterdir()) == [path]
    text = path.read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a result file")

    json.loads(text, parse_constant=refuse)  # no NaN or Infinity: any JSON reader takes it
    assert text.count("\n") < 30  # a line per field and per point, not per number
    read = results.read_record(path)
    assert read.curve[0] == written.curve[0]  # floats round-trip bit for bit
    assert read.curve[1]["train/loss"] == math.inf and math.isnan(read.curve[1]["train/grad_norm"])
    assert read.config == written.config and read.study == written.study
    assert (read.status, read.device, read.pack_size) == ("diverged", "cpu", 2)
    assert read.roles == written.roles
    values = json.loads(text)
    assert values["budget"] == {"iterations": 20, "base": 40, "fraction": 0.5}
    assert values["precision"] == "fp32" and values["format_version"] == results.FORMAT_VERSION


def edited(path: Path, **changes: object) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, "result format version 2 is unknown here"),
        ({"format": "other"}, "not a trial result file"),
        ({"status": "done"}, "status 'done' unknown; allowed: completed, diverged"),
        ({"trial_id": "t0002"}, "holds trial t0002, so it must be named t0002.json"),
        ({"config": {"lr": -1}}, "config: lr: must be > 0"),
        ({"curve": [{"iteration": 10}, {"iteration": 5}]}, "iterations must increase"),
        ({"curve": [{"iteration": 10, "val/accuracy": "high"}]}, "is not a number"),
        # int() would have read 100.5 as 100: a damaged file taken for a sound one.
        ({"curve": [{"iteration": 100.5}]}, "iteration must be a whole number >= 0 (100.5)"),
        ({"curve": [{"iteration": -5}]}, "iteration must be a whole number >= 0 (-5)"),
        ({"curve": [{"iteration": "inf"}]}, "iteration must be a whole number >= 0 (inf)"),
        ({"study": {"name": "s"}}, "damaged (ValueError: study.base_iterations: missing)"),
        # Each names its field, not Python's internals (TypeError: string indices ...).
        ({"study": "quick"}, "damaged (ValueError: study: expected a mapping, got 'quick')"),
        ({"roles": [1]}, "roles: expected a mapping, got [1]"),
        ({"timings": "x"}, "timings: expected a mapping, got 'x'"),
        ({"pack_size": "x"}, "pack_size: expected an integer, got 'x'"),
        ({"config": None}, "config: expected a mapping, got None"),
        ({"curve": {"iteration": 1}}, "curve: expected a list"),
        ({"curve": [{"iteration": 10, "val/accuracy": 10**400}]}, "is too large for a float"),
        # str() made these into text that reads as real ("['oom']", "42").
        ({"error": ["oom"]}, "error: expected text or null, got ['oom']"),
        ({"git_commit": 42}, "git_commit: expected text or null, got 42"),
        # An import tagged runs with these: a list reached MLflow's database, mid-import.
        ({"machine": {"cpu_cells": ["compiled"]}}, "machine.cpu_cells: expected text or null"),
        ({"machine": {"switches": {"HDETACH_X": 1}}}, "machine.switches: expected names and"),
        ({"study": {**STUDY_JSON, "name": "x/y"}}, "study.name: expected a study name, got the"),
        # ray/.. and reports/.. are the study folder itself: a report there replaces its files.
        ({"study": {**STUDY_JSON, "name": ".."}}, "study.name: expected a study name, got the"),
        ({"study": {**STUDY_JSON, "name": "x" * 300}}, "study.name: a study name is at most 200"),
        ({"study": {**STUDY_JSON, "overrides": 5}}, "study.overrides: expected a list, got 5"),
        (
            {"study": {**STUDY_JSON, "overrides": [["a"]]}},
            "study.overrides: expected [key, value]",
        ),
        # Cut short: it would be held completed at half its curve, for good.
        ({"status": "completed", "curve": [{"iteration": 10}]}, "curve ends at 10 of its 20"),
        ({"status": "running", "curve": [{"iteration": 30}]}, "curve ends at 30 of its 20"),
    ],
)
def test_an_unusable_file_is_one_line_naming_it(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    path = results.write_record(tmp_path, record())
    edited(path, **change)
    with pytest.raises(ResultError) as caught:
        results.read_record(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_a_one_trial_result_says_which_files_import(tmp_path: Path) -> None:
    path = tmp_path / "t0000.json"
    path.write_text(json.dumps({"config": {}, "status": "completed", "curve": []}))
    with pytest.raises(ResultError, match=r"t0000.json: a one-trial `study trial` result, of no "
                       r"study: only the files of `study trial --space SPACE`"):  # fmt: skip
        results.read_record(path)


def test_a_truncated_file_is_damaged(tmp_path: Path) -> None:
    path = results.write_record(tmp_path, record())
    path.write_text(path.read_text()[:100])
    with pytest.raises(ResultError, match=r"t0001.json: damaged, not JSON"):
        results.read_record(path)


def test_another_study_or_space_is_refused(tmp_path: Path) -> None:
    path = results.write_record(tmp_path, record())
    held = results.read_record(path)
    results.check_same_study(held, "s", "abc123abc123", path)
    with pytest.raises(ResultError, match="belongs to study s, not quick"):
        results.check_same_study(held, "quick", "abc123abc123", path)
    with pytest.raises(ResultError, match=r"from another space \(hash abc123abc123, this"):
        results.check_same_study(held, "s", "ffffff000000", path)


def test_only_trial_files_are_result_files(tmp_path: Path) -> None:
    for name in ("t0002.json", "t0000.json", "notes.json", ".t0001.123.partial"):
        (tmp_path / name).write_text("{}")
    (tmp_path / ".state").mkdir()
    assert [p.name for p in results.result_files(tmp_path)] == ["t0000.json", "t0002.json"]


def test_machine_info_names_the_cpu_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("HDETACH_CUDA_GRAPHS", "0")
    machine = results.machine_info(torch.device("cpu"))
    assert machine["switches"] == {"HDETACH_CUDA_GRAPHS": "0"}  # a kernel choice forced
    assert machine["cpu"] and machine["torch"] == torch.__version__ and machine["gpu"] is None
    # The threads and the LSTM cells: a curve's last bits depend on both.
    assert machine["threads"] == torch.get_num_threads()
    assert machine["cpu_cells"] == "compiled"  # gcc is there


def test_a_record_says_the_precision_used_and_the_gpu_its_packs_were_sized_for(
    tmp_path: Path,
) -> None:
    h200 = KNOWN_GPUS["h200"]
    on_gpu = record(device="cuda:0 (NVIDIA H200)", plan_gpu=h200)
    values = json.loads(results.record_text(on_gpu))
    assert values["config"]["precision"] == "auto" and values["precision"] == "tf32"
    assert values["plan_gpu"] == {"key": "h200", "name": h200.name, "sms": 132}
    read = results.read_record(results.write_record(tmp_path, on_gpu))
    assert read.plan_gpu == h200 and read.precision_used == "tf32"
    assert record(config=TrialConfig(precision="tf32")).precision_used == "fp32"  # on a CPU
