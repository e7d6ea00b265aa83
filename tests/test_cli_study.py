"""The study subcommands as a user runs them: plan, run, ls, resume, ui, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, printed_study, stop_process_group, wait_for_http

from study import cost_text, costs, tracking
from study.cli import main
from study.pack_layout import KNOWN_GPUS
from study.space import make_plan
from study.spec import load_spec

QUICK = REPO / "search_spaces" / "quick.yaml"
STUDY = str(Path(sys.executable).parent / "study")


def study(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [STUDY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def test_plan_prints_the_trial_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(QUICK)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("quick: 6 trials, searcher grid")
    assert "t0005  method=h_detach p_detach=0.25 seed=2" in out
    assert main(["plan", str(QUICK), "--smoke"]) == 0
    assert capsys.readouterr().out.startswith("quick (smoke): 2 trials")


def test_bad_space_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    bad = REPO / "tests" / "bad_spaces" / "clip_norm_off.yaml"
    for command in ("plan", "run"):
        assert main([command, str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith(f"study {command}: error: {bad}: field fixed.clip_norm: got False")


def test_input_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: no such file" in capsys.readouterr().err
    assert main(["resume", "ghost", "--output", str(tmp_path)]) == 2
    assert "no study 'ghost' in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["run", str(QUICK), "--max-concurrent", "0"])
    assert exited.value.code == 2
    assert main(["ls", "--output", str(tmp_path)]) == 0
    assert "no studies in" in capsys.readouterr().out


def test_ls_says_what_is_not_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before, each of these said only "no studies", as an empty store does.
    missing = tmp_path / "nodir" / "x.db"
    assert main(["ls", "--tracking-uri", f"sqlite:///{missing}"]) == 0
    said = f"no studies: no MLflow database at {missing} (not there, or empty)\n"
    assert capsys.readouterr().out == said
    assert not missing.parent.exists()  # nothing made
    # An empty file (touch mlflow.db): MLflow's schema was written into it by a read-only ls.
    empty = tmp_path / "empty" / "mlflow.db"
    empty.parent.mkdir()
    empty.touch()
    assert main(["ls", "--output", str(empty.parent)]) == 0
    assert capsys.readouterr().out == said.replace(str(missing), str(empty))
    assert empty.stat().st_size == 0 and sorted(empty.parent.iterdir()) == [empty]
    (tmp_path / "a.yaml").write_text("x: 1\n")
    for command in (["ls"], ["report", "quick"], ["ui"]):  # every --output: argparse's type
        with pytest.raises(SystemExit) as exited:
            main([*command, "--output", str(tmp_path / "a.yaml")])
        assert exited.value.code == 2
        assert "a.yaml': a file, not a study folder" in capsys.readouterr().err
    assert main(["ls", "--tracking-uri", ""]) == 2
    assert capsys.readouterr().err.startswith("study ls: error: --tracking-uri: empty;")


@pytest.mark.parametrize("folder", ["run #1", "a?b=1", "50%"])
def test_a_study_folder_with_uri_characters_is_refused(
    folder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In the folder's sqlite:/// URI they would put the database somewhere else.
    with pytest.raises(SystemExit) as exited:
        main(["run", str(QUICK), "--output", str(tmp_path / folder)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"study run: error: argument --output: '{tmp_path / folder}': a study folder's path may "
        "not hold ?, # or %\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["report", "resume"])
def test_a_yaml_file_for_a_study_name_says_which_name(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "search_spaces/quick.yaml"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"study {command}: error: argument NAME: expected a study name, the YAML file's stem "
        "(here: quick), got the path 'search_spaces/quick.yaml'\n"
    )


@pytest.mark.parametrize(
    ("words", "argument", "what"),
    [
        (["plan", "search_spaces/quick.yaml", "--name", " "], "--name", "a study name"),
        (["trial", "--space", "search_spaces/quick.yaml", "--name", ""], "--name", "a study name"),
        (["report", ""], "NAME", "a study name"),
        # Path("") is ".": the working folder, which would plan (or import) all that is there.
        (["plan", ""], "SPACE", "a path"),
        (["run", ""], "SPACE", "a path"),
        (["plan", "search_spaces/quick.yaml", "--commands", "--out", ""], "--out", "a path"),
        (["trial", "--space", "", "--out", "x"], "--space", "a path"),
        (["import", ""], "DIR", "a path"),
    ],
)
def test_an_empty_name_or_path_is_refused_in_one_line(
    words: list[str], argument: str, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(words)
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"study {words[0]}: error: argument {argument}: expected {what}, got an empty one\n"
    )


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_ui_port_must_be_a_tcp_port(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ui", "--port", port])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == f"study ui: error: argument --port: expected a TCP port 1..65535, got {port!r}\n"


@pytest.mark.slow
def test_quick_smoke_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "studies"
    ran = study("run", str(QUICK), "--smoke", "--output", str(output))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("running quick (smoke): 2 trials")
    assert [line[:12] for line in lines if line.startswith("[")] in (
        ["[1/2] t0000 ", "[2/2] t0001 "],
        ["[1/2] t0001 ", "[2/2] t0000 "],
    )
    assert "quick: 2 trials: 2 completed, 0 diverged, 0 failed, 0 pending" in lines
    assert lines[-1] == f"MLflow UI: {printed_study()} ui --output {output}"
    assert ran.stderr == ""  # Ray's and MLflow's chatter stays out of the user's terminal

    assert main(["ls", "--output", str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["quick", "2", "2", "0", "0", "0"]

    port = free_port()
    ui = subprocess.Popen(
        [STUDY, "ui", "--output", str(output), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=90, process=ui)
        url = (
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=quick"
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            experiment = json.load(response)["experiment"]
        assert experiment["name"] == "quick"
        # The UI shows the parent run's spec.yaml through the server, as a browser fetches it.
        parent = tracking.open_store(tracking.store_uri(output)).find_parent("quick").run_id
        url = f"http://127.0.0.1:{port}/get-artifact?path=spec.yaml&run_uuid={parent}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert "name: copying" in response.read().decode()
    finally:
        stop_process_group(ui)
    assert f"http://127.0.0.1:{port}" in ui.stdout.read().splitlines()[0]


def test_trial_help_names_the_registered_tasks_and_methods(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from study.methods import METHODS
    from study.tasks import TASKS

    with pytest.raises(SystemExit):
        main(["trial", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"--task TASK {' | '.join(TASKS)}" in out
    assert f"--method METHOD {' | '.join(METHODS)}" in out


@pytest.mark.parametrize(
    ("pair", "named"),
    [
        ("fixed.colour=red", "field fixed.colour: unknown key"),
        ("fixed.iterations=many", "field fixed.iterations: must be an integer"),
        ("fixed.iterations", "--set fixed.iterations: expected KEY=VALUE"),
        ("fixed.lr=[1", "--set fixed.lr=[1: the value is not valid YAML"),
    ],
)
@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_bad_set_is_one_line_and_exit_2(command, pair, named, tmp_path, capsys) -> None:
    args = [command, str(REPO / "search_spaces" / "quick.yaml"), "--set", pair]
    if command == "run":
        args += ["--output", str(tmp_path / "out")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and named in captured.err, captured.err
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_plan_with_set_names_another_study_and_shows_the_overrides(capsys) -> None:
    space = str(REPO / "search_spaces" / "paper" / "fig4_pixel_mnist_no_clip.yaml")
    assert main(["plan", space, "--set", "fixed.iterations=1000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fig4_pixel_mnist_no_clip-set-")
    assert "overrides (--set): fixed.iterations=1000" in out
    assert "budget: 1% of the space's 100000 its" in out
    assert 'claim fig4-no-clip-divergence (Fig. 4): "without gradient clipping' in out
    assert main(["plan", space, "--set", "fixed.iterations=1000", "--name", "mine"]) == 0
    assert capsys.readouterr().out.startswith("mine: 10 trials")


PAPER = REPO / "search_spaces" / "paper"
FIG4 = PAPER / "fig4_pixel_mnist_no_clip.yaml"


def test_plan_sizes_auto_packs_for_a_named_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(FIG4), "--gpu", "h200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        "  packs: auto -> 18 trials per pack on h200 (132 SMs; 7 programs of 128 rows per trial "
        "at batch 100, hidden 100, precision tf32)"
    ) in lines
    assert "  t0009  p0000  method=h_detach p_detach=0.25 seed=4" in lines  # all 10 in one
    assert main(["plan", str(PAPER / "fig2_copying.yaml"), "--gpu", "h100"]) == 0
    assert "auto -> 16 trials per pack on h100 (132 SMs; 8 programs of 128 rows per trial at " in (
        capsys.readouterr().out
    )
    # Each job of an array plans the same packs: the commands carry the GPU.
    assert main(["plan", str(FIG4), "--gpu", "h200", "--commands"]) == 0
    assert capsys.readouterr().out == (
        f"study trial --space {FIG4} --gpu h200 --pack p0000 --out studies/results/{FIG4.stem}\n"
    )
    # Planned without a GPU, the commands say so: a job on a GPU node must train the packs of
    # 1 listed here, not packs sized for its own GPU (which would have other ids).
    assert main(["plan", str(FIG4), "--gpu", "none", "--commands"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 10 and commands[9] == (
        f"study trial --space {FIG4} --gpu none --pack p0009 --out studies/results/{FIG4.stem}"
    )


@pytest.mark.parametrize("command", ["plan", "run", "trial --space"])
def test_a_bad_gpu_name_is_one_line_listing_the_known(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command.split(), str(FIG4), "--gpu", "h300"])
    assert exited.value.code == 2
    name = command.split()[0]
    assert capsys.readouterr().err == (
        f"study {name}: error: argument --gpu: unknown GPU 'h300'; "
        "allowed: h100, h200, a100, local, none\n"
    )


def test_without_a_gpu_auto_is_one_and_estimate_asks_for_gpu() -> None:
    # CUDA hidden from torch, so that on a GPU machine too this is the machine without one.
    script = (
        "import sys\n"
        "from study.cli import main\n"
        "for args in ([], ['--estimate'], ['--gpu', 'local'], ['--gpu', 'none', '--estimate']):\n"
        f"    print('status', main(['plan', {str(FIG4)!r}, *args]))\n"
        "    sys.stdout.flush(); sys.stderr.flush()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    without = "  packs: auto -> 1 (planned without a GPU; --gpu NAME sizes packs for one)"
    assert without in done.stdout
    assert "  t0009  method=h_detach p_detach=0.25 seed=4" in done.stdout  # no pack column
    assert done.stdout.count("status 2") == 3
    assert done.stderr.splitlines() == [
        "study plan: error: --estimate: no CUDA device here to estimate for; name a GPU with "
        "--gpu NAME",
        "study plan: error: --gpu local: torch sees no CUDA device here; name one: h100, h200, "
        "a100",
        "study plan: error: --estimate: --gpu none names no GPU to estimate for; name a GPU "
        "with --gpu NAME",
    ]


def test_plan_of_a_folder_prints_every_space_and_their_total(
    capsys: pytest.CaptureFixture[str],
) -> None:
    paper = REPO / "search_spaces" / "paper"
    spaces = sorted(paper.glob("*.yaml"))
    args = ["plan", str(paper), "--gpu", "h100", "--estimate", "--set", "resources.pack=16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for space in spaces:
        assert f"\n{space.stem}-set-" in f"\n{out}"
    # The table's lines once, at the end, after the total of all (the shipped h100 table).
    assert out.count("table source:") == out.count("GPU h100: NVIDIA H100") == 1
    total = out[out.index("GPU h100: NVIDIA H100") :].splitlines()
    assert total[1].startswith(f"all {len(spaces)} studies: 11.8 h of GPU time")
    assert len(total) == 2 + len(spaces) + 2
    # Without --estimate: the plans alone; --commands and --name take one space.
    assert main(["plan", str(paper), str(QUICK), "--gpu", "h200"]) == 0
    plans = capsys.readouterr().out
    assert plans.count(" trials, searcher ") == len(spaces) + 1
    assert plans.endswith(f"\n\nall {len(spaces) + 1} studies: 171 trials in 18 packs\n")
    for flag in (["--commands"], ["--name", "mine"]):
        assert main(["plan", str(paper), *flag]) == 2
        err = capsys.readouterr().err
        assert f"{flag[0]}: one SPACE at a time ({len(spaces)} given)" in err


def test_plan_estimate_prints_the_cost_after_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    tabled = sorted(path.stem for path in costs.RESULTS.glob("*.json"))
    assert "h100" in tabled  # the shipped table
    assert main(["plan", str(FIG4), "--gpu", "h100", "--estimate"]) == 0
    out = capsys.readouterr().out
    plan = make_plan(load_spec(FIG4), KNOWN_GPUS["h100"])
    assert out.startswith("fig4_pixel_mnist_no_clip: 10 trials")
    assert out.endswith("\n" + cost_text.estimate_text(plan, "h100") + "\n")
    untabled = [gpu for gpu in KNOWN_GPUS if gpu not in tabled]
    if untabled:  # a GPU without a table: one line, and no plan printed before it
        assert main(["plan", str(FIG4), "--gpu", untabled[0], "--estimate"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert f"no cost table for GPU {untabled[0]}" in captured.err
