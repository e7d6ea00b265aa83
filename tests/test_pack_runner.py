"""Packs trained in this process (`study trial --space`): each trial's file holds its solo curve,
an interrupted run continues to the uninterrupted curve, finished trials are kept, and neither
Ray nor MLflow is imported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, tiny_copying, write_space
from runner_fixtures import solo_curve

from study import pack_runner, pack_state, results
from study.config import TrialConfig
from study.errors import ConfigError
from study.models import cpu_cells
from study.pack_runner import Member, pack_commands, run_space, train_members, trial_command
from study.repro import derive_seed
from study.space import make_plan
from study.spec import load_spec
from study.tasks.copying import Copying
from study.train import train
from study.vocabulary import COMPLETED, DIVERGED, FAILED, RUNNING

STUDY_CLI = [sys.executable, "-m", "study.cli"]


def curves(folder: Path) -> dict[str, list[dict[str, float]]]:
    return {p.stem: results.read_record(p).curve for p in results.result_files(folder)}


def curves_of_a_whole_run(spec: Any, out: Path) -> dict[str, list[dict[str, float]]]:
    run_space(spec, out, echo=lambda line: None)
    return curves(out)


def packed_space(tmp_path: Path, **overrides: Any) -> Path:
    """4 trials in 2 packs of 2."""
    return write_space(tmp_path, "tiny", tiny_copying(resources={"pack": 2}, **overrides))


def poison(monkeypatch: pytest.MonkeyPatch, seed: int, iteration: int) -> None:
    """NaN inputs for one seed's batch at one iteration: that trial diverges there."""
    original = Copying.train_batch
    data_seed = derive_seed(seed, "data_order")

    def train_batch(self: Copying, it: int, batch_size: int, seed_: int) -> Any:
        x, y = original(self, it, batch_size, seed_)
        if seed_ == data_seed and it == iteration:
            x = x * float("nan")
        return x, y

    monkeypatch.setattr(Copying, "train_batch", train_batch)


def test_each_trial_file_holds_its_solo_curve(tmp_path: Path) -> None:
    spec = load_spec(packed_space(tmp_path))
    lines: list[str] = []
    assert run_space(spec, tmp_path / "out", echo=lines.append) == 0
    plan = make_plan(spec)
    files = results.result_files(tmp_path / "out")
    assert [p.stem for p in files] == [t.trial_id for t in plan.trials]
    for trial, path in zip(plan.trials, files, strict=True):
        record = results.read_record(path)
        assert record.status == COMPLETED and record.config == trial.config
        assert record.curve == solo_curve(trial.config)  # bit for bit: packed equals solo
        assert (record.pack_size, record.roles, record.device) == (2, plan.roles, "cpu")
        assert record.study.space_hash == spec.spec_hash()
        assert record.command.endswith(f"--pack {record.pack_id} --out {tmp_path / 'out'}")
        assert record.machine["threads"] == 1 and record.timings["sessions"] == 1
    assert not any((tmp_path / "out" / pack_runner.STATE_FOLDER).glob("*"))
    assert lines[-1].startswith("tiny: 4 completed in ")


def test_an_interrupted_run_continues_to_the_uninterrupted_curve(tmp_path: Path) -> None:
    spec = load_spec(packed_space(tmp_path, fixed={"iterations": 40, "eval_every": 10}))
    run_space(spec, tmp_path / "whole", echo=lambda line: None)

    def stop_in_second_pack(line: str) -> None:
        if "p0001: 20/40" in line:  # after its second evaluation was saved
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_space(spec, out, echo=stop_in_second_pack)
    first_pack = {p.name: p.stat().st_mtime_ns for p in (out / "t0000.json", out / "t0001.json")}
    held = {p.stem: results.read_record(p) for p in results.result_files(out)}
    assert [held[t].status for t in sorted(held)] == [COMPLETED, COMPLETED, RUNNING, RUNNING]
    assert held["t0002"].last_iteration == 20
    assert (out / pack_runner.STATE_FOLDER / "p0001.pt").is_file()

    lines: list[str] = []
    assert run_space(spec, out, echo=lines.append) == 0
    assert "2 finished already" in lines[0] and "p0000" not in "".join(lines)
    assert curves(out) == curves(tmp_path / "whole")
    assert {p: (out / p).stat().st_mtime_ns for p in first_pack} == first_pack  # not rewritten
    assert results.read_record(out / "t0002.json").timings["sessions"] == 2


@pytest.mark.parametrize("damage", ["truncated", "other cells"])
def test_a_state_it_must_not_continue_is_refused_with_every_file_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    # Before, a damaged state (a truncated copy) failed the pack's trials: their result files
    # were rewritten as failed with an empty curve, and every rerun failed the same way.
    spec = load_spec(packed_space(tmp_path, fixed={"iterations": 40, "eval_every": 10}))

    def stop_in_first_pack(line: str) -> None:
        if "p0000: 20/40" in line:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_space(spec, out, echo=stop_in_first_pack)
    state_file = out / pack_runner.STATE_FOLDER / "p0000.pt"
    if damage == "truncated":
        state_file.write_bytes(state_file.read_bytes()[:100])
        expected = f"{state_file}: damaged saved state ("
    else:
        monkeypatch.setattr(cpu_cells, "implementation", lambda device: "torch")
        expected = f"{state_file}: computed with the compiled LSTM cells"
    kept = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        run_space(spec, out, echo=lambda line: None)
    assert str(refused.value).startswith(expected)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert results.read_record(out / "t0000.json").last_iteration == 20
    if damage == "other cells":  # under the cells that computed it, the state continues
        monkeypatch.undo()
        assert run_space(spec, out, echo=lambda line: None) == 0
        assert curves(out) == curves_of_a_whole_run(spec, tmp_path / "whole")


def test_a_diverged_member_is_written_at_once_and_its_pack_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(packed_space(tmp_path))
    poison(monkeypatch, seed=1, iteration=13)  # t0001 (method none, seed 1), in pack p0000
    run_space(spec, tmp_path / "out", echo=lambda line: None)
    held = {p.stem: results.read_record(p) for p in results.result_files(tmp_path / "out")}
    assert [held[t].status for t in sorted(held)] == [COMPLETED, DIVERGED, COMPLETED, DIVERGED]
    assert held["t0001"].last_iteration == 14 and held["t0001"].curve[-1]["train/loss"] != 0
    for trial in make_plan(spec).trials:
        solo = solo_curve(trial.config)
        assert [repr(p) for p in held[trial.trial_id].curve] == [repr(p) for p in solo]


def test_a_failing_pack_is_recorded_and_the_next_pack_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(packed_space(tmp_path))
    original = Copying.train_batch
    raised: list[int] = []

    def broken(self: Copying, it: int, batch_size: int, seed: int) -> Any:
        if it == 12 and not raised:  # once: the first pack fails, the second does not
            raised.append(it)
            raise RuntimeError("disk gone")
        return original(self, it, batch_size, seed)

    monkeypatch.setattr(Copying, "train_batch", broken)
    lines: list[str] = []
    assert run_space(spec, tmp_path / "out", echo=lines.append) == 1
    held = {p.stem: results.read_record(p) for p in results.result_files(tmp_path / "out")}
    assert [held[t].status for t in sorted(held)] == [FAILED, FAILED, COMPLETED, COMPLETED]
    assert held["t0000"].error == "RuntimeError: disk gone" and held["t0000"].last_iteration == 10
    assert "  p0000: failed: RuntimeError: disk gone" in lines
    monkeypatch.setattr(Copying, "train_batch", original)
    assert run_space(spec, tmp_path / "out", echo=lines.append) == 0  # failed ones run again
    assert curves(tmp_path / "out")["t0000"] == solo_curve(make_plan(spec).trials[0].config)


def test_chosen_packs_or_trials_only(tmp_path: Path) -> None:
    spec = load_spec(packed_space(tmp_path))
    run_space(spec, tmp_path / "a", packs=["p0001"], echo=lambda line: None)
    assert sorted(curves(tmp_path / "a")) == ["t0002", "t0003"]
    run_space(spec, tmp_path / "b", trials=["t0003", "t0000"], echo=lambda line: None)
    assert sorted(curves(tmp_path / "b")) == ["t0000", "t0003"]
    assert curves(tmp_path / "b")["t0003"] == curves(tmp_path / "a")["t0003"]
    # Each file's command trains what this run did, so that it continues it: the pack where
    # the whole pack was chosen, else the chosen trials of it (their saved state is theirs).
    commands = {
        folder: {t: results.read_record(p).command for t, p in _files(tmp_path / folder).items()}
        for folder in ("a", "b")
    }
    assert commands["a"]["t0002"] == trial_command(spec, tmp_path / "a", ["p0001"])
    assert commands["b"]["t0000"].endswith(f"--trials t0000 --out {tmp_path / 'b'}")
    assert commands["b"]["t0003"].endswith(f"--trials t0003 --out {tmp_path / 'b'}")
    with pytest.raises(
        ConfigError, match=r"--pack p0009: not in the plan; the plan has p0000..p0001"
    ):
        run_space(spec, tmp_path / "c", packs=["p0009"])
    with pytest.raises(ConfigError, match=r"--trials t0004: not in the plan"):
        run_space(spec, tmp_path / "c", trials=["t0004"])


def test_a_folder_of_another_space_or_a_file_is_refused(tmp_path: Path) -> None:
    space = packed_space(tmp_path)
    run_space(load_spec(space), tmp_path / "out", packs=["p0000"], echo=lambda line: None)
    other = load_spec(space, overrides=["fixed.lr=0.02"], name="tiny")
    with pytest.raises(ConfigError, match=r"--out: .*t0000.json: from another space"):
        run_space(other, tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--out .*file: a file; with --space, --out names a"):
        run_space(load_spec(space), tmp_path / "file")
    optuna = write_space(
        tmp_path,
        "tuned",
        tiny_copying(nuisance={"lr": {"min": 1e-3, "max": 1e-2}}, search={"searcher": "optuna"}),
    )
    with pytest.raises(ConfigError, match="optuna .* trains grid and random spaces"):
        run_space(load_spec(optuna), tmp_path / "o")


def test_commands_rebuild_the_space_options_quoted(tmp_path: Path) -> None:
    folder = tmp_path / "my spaces"
    folder.mkdir()
    space = packed_space(folder)
    spec = load_spec(space, smoke=False, overrides=["fixed.lr=0.02", "task.T=6"], name="mine")
    out = tmp_path / "out dir"
    command = trial_command(spec, out, ["p0001"])
    assert command == (
        f"study trial --space '{space}' --set fixed.lr=0.02 --set task.T=6 --name mine "
        f"--pack p0001 --out '{out}'"
    )
    assert pack_commands(spec, out) == [trial_command(spec, out, [p]) for p in ("p0000", "p0001")]
    default = load_spec(space, overrides=["fixed.lr=0.02"])  # named tiny-set-HASH: no --name
    assert "--name" not in trial_command(default, out)


def test_a_lone_trials_state_of_the_old_format_resumes(tmp_path: Path) -> None:
    options = {"T": 5, "train_size": 200, "val_size": 50}
    config = TrialConfig(task_options=options, hidden_size=8, iterations=20, eval_every=10)
    states: list[dict[str, Any]] = []
    train(config, lambda progress: states.append(progress.checkpoint()))
    state_file = tmp_path / "t0000.pt"
    torch.save({"status": RUNNING, "state": states[0]}, state_file)  # as Ray trials saved it
    member = Member("t0000", config)
    seen: list[int] = []
    train_members([member], state_file, lambda: seen.append(member.iteration), packed=False)
    assert seen == [20] and member.finished and member.status == COMPLETED
    saved = pack_state.load_state(state_file, ["t0000"])["t0000"]
    assert saved["state"] is None and saved["status"] == COMPLETED


def test_a_state_saved_finished_but_never_reported_is_reported_on_resume(tmp_path: Path) -> None:
    """Its process died after saving the last evaluation, before telling Tune: without this
    report, Tune completed the trial with its stale last result."""
    options = {"T": 5, "train_size": 200, "val_size": 50}
    config = TrialConfig(task_options=options, hidden_size=8, iterations=20, eval_every=10)
    state_file = tmp_path / "t0000.pt"
    first = Member("t0000", config)
    train_members([first], state_file, lambda: None, packed=False)
    again = Member("t0000", config)
    seen: list[tuple[int, str]] = []
    train_members([again], state_file, lambda: seen.append((again.iteration, again.status)),
                  packed=False)  # fmt: skip
    assert seen == [(20, COMPLETED)] and again.latest == first.latest and again.finished


def test_study_trial_space_imports_neither_ray_nor_mlflow(tmp_path: Path) -> None:
    space = write_space(tmp_path, "tiny", tiny_copying(replicates={"seeds": 1}))
    probe = (
        "import sys; from study.cli import main; code = main(sys.argv[1:]); "
        "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))"
    )
    command = [sys.executable, "-c", probe, "trial", "--space", str(space)]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and len(results.result_files(tmp_path / "o")) == 2


@pytest.mark.slow
def test_killed_mid_pack_it_loses_no_trial_and_gives_the_uninterrupted_curve(
    tmp_path: Path,
) -> None:
    # A pack takes a few seconds here: long enough to be killed between two evaluations.
    space = packed_space(tmp_path, fixed={"iterations": 1000, "eval_every": 100})
    out = tmp_path / "out"
    command = [*STUDY_CLI, "trial", "--space", str(space), "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    state = out / pack_runner.STATE_FOLDER / "p0001.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = {p: p.read_bytes() for p in (out / "t0000.json", out / "t0001.json")}
    assert all(json.loads(text)["status"] == COMPLETED for text in finished.values())

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "2 finished already" in again.stdout
    assert {p: p.read_bytes() for p in finished} == finished  # kept, not trained again
    whole = tmp_path / "whole"
    run_space(load_spec(space), whole, echo=lambda line: None)
    assert curves(out) == curves(whole)
    assert results.read_record(out / "t0003.json").timings["sessions"] == 2


def _files(folder: Path) -> dict[str, Path]:
    return {path.stem: path for path in results.result_files(folder)}
