"""`study trial`: one trial from the command line, its JSON output and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from study.cli import main

TINY = [
    "--task",
    "copying",
    "--task-opt",
    "T=3",
    "--task-opt",
    "train_size=200",
    "--task-opt",
    "val_size=50",
    "--hidden-size",
    "8",
    "--batch-size",
    "10",
]


def test_writes_config_status_and_curve(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "result.json"
    args = [
        "trial",
        *TINY,
        "--method",
        "h_detach",
        "--p-detach",
        "0.5",
        "--clip-norm",
        "none",
        "--iterations",
        "20",
        "--eval-every",
        "10",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and captured.out.startswith("completed: copying h_detach")
    assert "20/20 it" in captured.err  # the progress bar lives on stderr
    result = json.loads(out.read_text())
    assert result["status"] == "completed"
    assert result["config"]["clip_norm"] is None and result["config"]["p_detach"] == 0.5
    assert [p["iteration"] for p in result["curve"]] == [10, 20]
    assert {"val/accuracy", "val/loss", "train/loss", "train/grad_norm"} <= set(result["curve"][0])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method", "h_detach", "--p-detach", "1.5"], "--p-detach: must be in [0, 1]"),
        (["--method", "h_detach", "--p-detach", "-0.1"], "--p-detach: must be in [0, 1]"),
        (["--task", "adding"], "--task: unknown task 'adding'; allowed: copying"),
        (["--method", "zoneout"], "--method: unknown method 'zoneout'; allowed: none"),
        (["--task-opt", "T=0"], "--task-opt T: must be >= 1"),
        (["--lr", "0"], "--lr: must be > 0"),
        (["--lr", "-3"], "--lr: must be > 0"),
        (["--clip-norm", "big"], "argument --clip-norm: expected a number > 0 or none"),
        (["--task-opt", "T"], "argument --task-opt: expected KEY=VALUE"),
        (["--iterations", "many"], "argument --iterations: invalid int value"),
        (["--device", "tpu"], "--device: must be cpu, cuda, cuda:N or auto"),
    ],
)
def test_bad_flags_exit_non_zero_with_one_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    try:
        status = main(["trial", *flags])  # config errors return 2
    except SystemExit as exit_:  # argparse errors exit 2
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_reports_missing_data_without_traceback(tmp_path: Path) -> None:
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "study.cli",
            "trial",
            "--task",
            "pixel_mnist",
            "--task-opt",
            f"data_dir={tmp_path}",
            "--iterations",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    assert process.stderr.count("\n") == 1 and "Traceback" not in process.stderr
    assert str(tmp_path) in process.stderr and "download=true" in process.stderr
