"""benchmarks/pack_sweep.py: the cost-table sweep, run on a CPU at a tiny shape, its measuring
child process (failures and hangs), and benchmarks/gpu_check.sh, which runs it on a GPU."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from study import costs

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
GPU_CHECK = BENCHMARKS / "gpu_check.sh"
STAGE_LIMIT_TOTAL = 540  # 9 minutes: what one run on the GPU machine may take (gpu_check.sh)


@pytest.fixture(scope="module")
def pack_sweep():
    """The script as a module (it imports lstm_step_cuda from its own folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("pack_sweep")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def cpu_sweep(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess, Path]:
    """One run of the script as gpu_check.sh runs it, on a CPU: tiny shape, K 1 and 2, fp32,
    a folder as --table, and the estimate check (shortened to 10 iterations)."""
    folder = tmp_path_factory.mktemp("table")
    command = [sys.executable, str(BENCHMARKS / "pack_sweep.py"), "--device", "cpu"]
    command += ["--shapes", "tiny", "--members", "1", "2", "--precisions", "fp32"]
    command += ["--rounds", "1", "--steps", "1", "--table", str(folder)]
    command += ["--check-estimate", "--check-iterations", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, folder / "cpu.json"


def test_the_table_follows_the_cost_table_contract(cpu_sweep) -> None:
    _, path = cpu_sweep
    raw = json.loads(path.read_text())
    assert set(raw) == {*costs.TABLE_FIELDS, "entries"}
    assert raw["gpu"] == "cpu" and raw["source"] == "benchmarks/pack_sweep.py"
    assert "--shapes tiny" in raw["command"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", raw["measured_on"])
    assert [entry["members"] for entry in raw["entries"]] == [1, 2]
    for entry in raw["entries"]:
        assert (entry["shape"], entry["steps"], entry["hidden"], entry["batch"]) == (
            "tiny",
            5,
            16,
            8,
        )
        assert entry["precision"] == "fp32" and entry["kernel"]
        assert entry["ms_per_pack_step"] > 0 and entry["cudnn_step_ms"] > 0
        per_trial = entry["ms_per_pack_step"] / entry["members"]
        assert entry["ms_per_trial_step"] == pytest.approx(per_trial, rel=1e-3)
        assert entry["eval_ms_per_pack_batch"] > 0
        assert entry["start_ms"] > 0  # building the members is in the first call, not a step
    # The reader of the contract takes it whole.
    table = costs.load_table("cpu", path.parent)
    assert costs.step_ms(table, steps=5, hidden=16, batch=8, members=2, precision="fp32") > 0


def test_the_printed_table_has_a_row_per_pack_and_the_verdicts(cpu_sweep) -> None:
    done, _ = cpu_sweep
    out = done.stdout
    assert "tiny (CPU check): T=5, B=8, H=16" in out
    for members in (1, 2):
        assert re.search(rf"^fp32\s+{members}\s+-\s+\S.*\d+\.\d\d\s", out, flags=re.M), out
    assert "issue 18 target: best per-trial step <= 0.1 x cuDNN step at tiny:" in out
    # No tf32 point ran, so that target has nothing to read.
    assert "single trial tf32 <= 1.0 x cuDNN step at tiny: not measured" in out
    # The paper's shapes are not in a tiny table: the whole study has no price, and says why.
    assert re.search(
        r"^issue 18 target: whole paper study <= 1 GPU-hour on cpu: not measured: 0 of \d+ "
        r"trials priced; cpu.json: no entry for H=100",
        out,
        flags=re.M,
    ), out
    assert re.search(
        r"^estimate check \(tiny, pack of 2, fp32, .* ms \(start-up\) \+ 10 x .* ratio \d",
        out,
        flags=re.M,
    ), out


def test_a_failed_point_is_reported_and_a_hung_one_is_cut_off(pack_sweep) -> None:
    runner = pack_sweep.Runner("cpu")
    try:
        assert runner.start(timeout=120)["device_name"] == "CPU"
        request = {"kind": "pack", "precision": "fp32", "members": 1, "rounds": 1, "steps": 1}
        failed = runner.ask({**request, "shape": "no_such_shape"}, timeout=120)
        assert failed["error"].startswith("KeyError")
        # Minutes of CPU work: the answer cannot come within the time given.
        hung = runner.ask({**request, "shape": "copying", "members": 16, "steps": 50}, timeout=2)
        assert "no answer within" in hung["error"]
        # The next point runs in a fresh child.
        measured = runner.ask({**request, "shape": "tiny"}, timeout=120)
        assert measured["ms"] > 0
    finally:
        runner.close()


def test_gpu_keys_and_table_paths(pack_sweep, tmp_path: Path) -> None:
    assert pack_sweep.gpu_key("NVIDIA H200") == "h200"
    assert pack_sweep.gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert pack_sweep.gpu_key("NVIDIA GeForce RTX 4090") == "nvidiageforcertx4090"
    file, folder = str(tmp_path / "x.json"), str(tmp_path / "out")
    paths = pack_sweep.table_paths([file, folder], "h200", cuda=True)
    assert paths == [tmp_path / "x.json", tmp_path / "out" / "h200.json"]
    assert pack_sweep.table_paths(None, "h200", cuda=True)[0].parts[-3:] == (
        "benchmarks",
        "results",
        "h200.json",
    )
    assert pack_sweep.table_paths(None, "cpu", cuda=False) == []


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
    pack_sweep, tmp_path: Path
) -> None:
    sweep = pack_sweep.Sweep(argparse.Namespace(device="cuda"), "NVIDIA H200", 132, "2.11")
    both = ("copying", "pixel_mnist")
    # 0.1 ms a pack step: copying T=100 2 packs x 600,000 its (120 s), T=300 one scaled by
    # 320/120 steps (160 s), pixel and permuted MNIST 9 packs x 100,000 its (90 s): 370 s.
    lines = pack_sweep.whole_study(sweep, [_paper_table(tmp_path, 0.1, both)])
    target = "issue 18 target: whole paper study <= 1 GPU-hour on h200: "
    assert lines[0] == (
        f"{target}0.10 h met (6 min of GPU time (training steps only) for 165 of 165 trials in "
        "12 of 12 packs)"
    )
    assert lines[1].splitlines()[1].startswith("all 8 studies: 6 min")
    slow = pack_sweep.whole_study(sweep, [_paper_table(tmp_path, 10.0, both)])
    assert slow[0].startswith(f"{target}10.28 h MISSED")
    # A shape the run did not measure: no verdict, and why.
    copying_only = pack_sweep.whole_study(sweep, [_paper_table(tmp_path, 0.1, ("copying",))])
    assert copying_only[0].startswith(f"{target}not measured: 45 of 165 trials priced; h200.json")
    unwritten = pack_sweep.whole_study(sweep, [tmp_path / "elsewhere" / "h100.json"])
    assert unwritten == [f"{target}not measured (no --table written for h200)"]


@pytest.mark.parametrize(
    "flags",
    [["--members", "0"], ["--members", "two"], ["--device", "cpu", "--members", "auto"]],
)
def test_bad_flags_are_one_line_errors(pack_sweep, flags: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        pack_sweep.parse_args(flags)
    assert "--members" in capsys.readouterr().err


def test_gpu_check_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


def test_gpu_check_stages_fit_in_nine_minutes() -> None:
    stages = re.findall(r"^\s*stage (\w+) (\d+) ", GPU_CHECK.read_text(), flags=re.M)
    names = [name for name, _ in stages]
    assert {"device", "split_tests", "wide_tests", "tests", "pack_sweep", "lstm_step"} <= set(
        names
    )
    assert sum(int(limit) for _, limit in stages) <= STAGE_LIMIT_TOTAL
