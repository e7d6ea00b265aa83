"""benchmarks/pack_sweep.py: the cost-table sweep, run on a CPU at a tiny shape as gpu_check.sh
runs it on a GPU (the table, the printed verdicts, a run stopped mid-shape), its flags, and
benchmarks/gpu_check.sh itself."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench_modules import benchmark_module

from study import costs

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
GPU_CHECK = BENCHMARKS / "gpu_check.sh"
STAGE_LIMIT_TOTAL = 540  # 9 minutes: what one run on the GPU machine may take (gpu_check.sh)


@pytest.fixture(scope="module")
def pack_sweep():
    return benchmark_module("pack_sweep")


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


def test_a_run_stopped_mid_shape_keeps_its_measured_points_and_leaves_no_child(
    tmp_path: Path,
) -> None:
    """gpu_check.sh's stage limit sends SIGTERM: the table already holds every point measured
    (it is rewritten after each), and the measuring child, in its own process group, is killed
    with the sweep rather than left holding the device."""
    table = tmp_path / "cpu.json"
    command = [sys.executable, str(BENCHMARKS / "pack_sweep.py"), "--device", "cpu"]
    command += ["--shapes", "tiny", "--precisions", "fp32", "--rounds", "1", "--steps", "1"]
    # K=1 takes a second; K=4000 minutes (thousands of members built one by one).
    command += ["--members", "1", "4000", "--point-cap-s", "100000", "--point-timeout-s", "600"]
    command += ["--budget-s", "600", "--table", str(table)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "sweep.log"
    with log.open("w") as output:
        sweep = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 240
        while not table.exists() and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.2)
        assert table.exists(), f"no table after the first point: {log.read_text()}"
        children = _children_of(sweep.pid)
        assert children, f"the measuring child is not running: {log.read_text()}"
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert [entry["members"] for entry in json.loads(table.read_text())["entries"]] == [1]
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)], "a measuring child outlived the sweep"


def _children_of(pid: int) -> list[int]:
    """The process ids whose parent is pid (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while being read
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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
