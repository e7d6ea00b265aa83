"""`study trial`: one trial from the command line, its JSON output and its one-line errors."""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_copying, write_space

from study.cli import main
from study.config import TrialConfig

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
    out = tmp_path / "new" / "nested" / "result.json"  # --out creates missing folders
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
        (["--task-opt", "T=[1"], "argument --task-opt: T: value '[1' is not valid YAML"),
        (["--task-opt", "=5"], "argument --task-opt: expected KEY=VALUE with a non-empty KEY"),
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


def test_missing_data_names_the_task_opt_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["trial", "--task", "pixel_mnist", "--task-opt", f"data_dir={tmp_path}"]
    assert main([*args, "--iterations", "1"]) == 2  # raised by the task, at train time
    err = capsys.readouterr().err
    assert err.startswith(f"study trial: error: --task-opt data_dir: {tmp_path} lacks"), err
    assert err.count("\n") == 1


SHORT = [*TINY, "--iterations", "20", "--eval-every", "5"]


@pytest.mark.parametrize("where", ["folder", "under_a_file", "proc"])
def test_bad_out_fails_before_training(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "afile").write_text("")
    out, message = {
        "folder": (tmp_path, "is a folder"),
        "under_a_file": (tmp_path / "afile" / "x.json", "afile is a file"),
        "proc": (Path("/proc/r.json"), "cannot write files in /proc"),
    }[where]
    if where == "proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    assert main(["trial", *SHORT, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no training ran
    assert captured.err.startswith("study trial: error: --out: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_an_existing_empty_writable_file_is_enough_for_out(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E.g. /dev/stdout, or a file made for it in a shared read-only folder: only the file itself
    must take writes (os.access says no to every folder here, as to a user in /dev)."""
    out = tmp_path / "r.json"
    out.write_text("")
    monkeypatch.setattr("os.access", lambda *args, **kwargs: False)
    assert main(["trial", *SHORT, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["status"] == "completed"


def test_an_earlier_result_is_never_written_over(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "r.json"
    assert main(["trial", *SHORT, "--out", str(out)]) == 0
    kept = out.read_text()
    capsys.readouterr()
    assert main(["trial", *SHORT, "--seed", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"study trial: error: --out: {out} exists and is not empty (an earlier result?); give "
        "another path, or delete it first to write there\n"
    )
    assert out.read_text() == kept


def test_failed_write_prints_the_result_instead(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    out = tmp_path / "r.json"
    assert main(["trial", *SHORT, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    summary, _, text = captured.out.partition("\n")
    assert summary.startswith("completed: copying")
    result = json.loads(text)  # the result is not lost
    assert result["status"] == "completed" and len(result["curve"]) == 4
    assert captured.err.splitlines()[-1] == (
        f"study trial: error: --out: cannot write {out} (No space left on device); "
        "the result JSON is on stdout"
    )


def test_ctrl_c_saves_the_curve_so_far(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from study import cli_trial as cli
    from study.trial import Progress

    update = cli._ProgressBar.update

    def interrupt_at_10(self: cli._ProgressBar, progress: Progress) -> None:
        update(self, progress)
        if progress.iteration == 10:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-run

    monkeypatch.setattr(cli._ProgressBar, "update", interrupt_at_10)
    out = tmp_path / "r.json"
    assert main(["trial", *SHORT, "--out", str(out)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "study trial: interrupted"
    result = json.loads(out.read_text())
    assert result["status"] == "interrupted" and result["config"]["iterations"] == 20
    assert [p["iteration"] for p in result["curve"]] == [5, 10]
    assert "val/accuracy" in result["curve"][-1]


def test_a_model_too_large_for_memory_is_one_line(capsys: pytest.CaptureFixture) -> None:
    # 4 x 10^6 x 10^6 weights: 16 TB, which no allocator grants.
    assert main(["trial", "--hidden-size", "1000000", "--iterations", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study trial: error: out of memory on cpu (") and err.count("\n") == 1
    assert err.rstrip().endswith("try a smaller --hidden-size, --batch-size or sequence length "
                                 "(--task-opt T=...)")  # fmt: skip


def test_precision_auto_is_the_default_and_the_output_says_what_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "r.json"
    assert main(["trial", *SHORT, "--out", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().rpartition(" | ")[2].startswith("cpu fp32, ")
    result = json.loads(out.read_text())
    assert result["config"]["precision"] == "auto" and result["precision"] == "fp32"
    assert main(["trial", *SHORT, "--precision", "fp16"]) == 2
    assert capsys.readouterr().err == (
        "study trial: error: --precision: must be fp32, tf32 or auto, got 'fp16'\n"
    )


def test_gpu_needs_a_space_and_sizes_its_packs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["trial", *SHORT, "--gpu", "h200"]) == 2
    assert capsys.readouterr().err == (
        "study trial: error: --gpu: needs --space SPACE (it chooses from a space)\n"
    )
    body = tiny_copying(fixed={"device": "auto"}, resources={"pack": "auto"})
    space = write_space(tmp_path, "tiny", body)
    out = tmp_path / "trials"
    # Sized for an H200 (132 // 1 program at hidden 8, batch 10): the 4 trials in one pack,
    # trained here on the CPU as packs always can be.
    assert main(["trial", "--space", str(space), "--gpu", "h200", "--out", str(out)]) == 0
    capsys.readouterr()
    record = json.loads((out / "t0003.json").read_text())
    assert (record["pack_id"], record["pack_size"]) == ("p0000", 4)
    assert record["plan_gpu"]["key"] == "h200" and "--gpu h200 --pack p0000" in record["command"]


@pytest.mark.parametrize(
    "flag",
    [
        ["--device", "cpu"],  # the default value: before, it passed unnoticed
        ["--seed", "0"],
        ["--lr", "0.001"],
        ["--clip-norm", "none"],
        ["--task-opt", "T=5"],
        ["--lr", "0.002"],
        ["--threads", "1"],  # the space's resources.cpus sets them
    ],
)
def test_with_a_space_a_one_trial_flag_is_refused_even_at_its_default(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: list[str]
) -> None:
    space = write_space(tmp_path, "tiny", tiny_copying(fixed={"device": "auto"}))
    out = tmp_path / "trials"
    assert main(["trial", "--space", str(space), *flag, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"study trial: error: {flag[0]}: with --space the space sets every value; change one "
        "with --set KEY=VALUE\n"
    )
    assert not out.exists()  # refused before anything trained


def test_one_trial_runs_on_the_threads_asked_not_every_core(tmp_path: Path) -> None:
    # torch's default is every core; the curve's last bits depend on the threads, so one trial
    # runs on 1 (as a study's trial with resources.cpus: 1) unless --threads says otherwise,
    # its file records them and the cells, and the caller's setting is put back.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for flags, threads in (([], 1), (["--threads", "2"], 2)):
            out = tmp_path / f"r{threads}.json"
            assert main(["trial", *TINY, "--iterations", "2", *flags, "--out", str(out)]) == 0
            machine = json.loads(out.read_text())["machine"]
            assert machine["threads"] == threads and machine["cpu_cells"] == "compiled"
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_without_a_space_the_flags_left_out_take_their_defaults(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["trial", *TINY, "--iterations", "2", "--out", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    defaults = TrialConfig()
    for field in ("lr", "seed", "clip_norm", "device", "precision", "method", "optimizer"):
        assert config[field] == getattr(defaults, field), field
    assert config["task_options"] == {"T": 3, "train_size": 200, "val_size": 50}


def test_a_diverged_trials_summary_keeps_its_best_so_far() -> None:
    from study.cli_trial import _last_finite

    # A diverged trial's last point holds the non-finite loss and no evaluation.
    curve = [
        {"iteration": 10, "best/val_accuracy": 0.13},
        {"iteration": 13, "train/loss": math.inf},
    ]
    assert _last_finite(curve, "best/val_accuracy") == 0.13
    assert math.isnan(_last_finite(curve[1:], "best/val_accuracy"))


def test_a_task_option_given_twice_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert main(["trial", "--task-opt", "T=10", "--task-opt", "T=20", "--iterations", "2"]) == 2
    assert capsys.readouterr().err == "study trial: error: --task-opt T: given twice (10, 20)\n"
