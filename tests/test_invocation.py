"""The printed hints name `study` and `mlflow` so that they run as printed: the bare name only
where PATH finds the very script this process was started as."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_copying, write_space

from study.invocation import program


def scripts(folder: Path) -> Path:
    """A bin folder holding a `study` and an `mlflow` script, as a virtual environment's."""
    folder.mkdir(parents=True)
    for name in ("study", "mlflow"):
        script = folder / name
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
    return folder


def test_a_script_outside_path_is_named_by_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's `.venv/bin/study run ...` with no activated environment.
    scripts(tmp_path / ".venv" / "bin")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [".venv/bin/study", "run"])
    assert program() == ".venv/bin/study"
    assert program("mlflow") == ".venv/bin/mlflow"


def test_the_bare_name_where_path_finds_the_same_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_folder = scripts(tmp_path / "env" / "bin")
    monkeypatch.setenv("PATH", f"{bin_folder}:/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [str(bin_folder / "study"), "run"])
    assert program() == "study"
    assert program("mlflow") == "mlflow"


def test_another_study_first_on_path_is_not_taken_for_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An older install earlier on PATH would run other code than the one that printed the hint.
    other = scripts(tmp_path / "old" / "bin")
    mine = scripts(tmp_path / "my env" / "bin")
    monkeypatch.setenv("PATH", f"{other}:{mine}:/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [str(mine / "study"), "ui"])
    assert program() == f"'{mine / 'study'}'"  # quoted: the folder's name has a space


def test_outside_a_study_script_the_bare_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert program() == "study"
    # A `study` script with no mlflow beside it (an install without the tracking extra).
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "study").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "argv", [str(folder / "study")])
    assert program("mlflow") == "mlflow"


def test_a_printed_hint_runs_as_printed(tmp_path: Path) -> None:
    # The real console script, started by its path as the README starts it, from a shell whose
    # PATH lacks its folder: the `study import` line that `study trial --space` ends with must
    # run there as printed, not answer "command not found".
    space = write_space(tmp_path, "hinted", tiny_copying(replicates={"seeds": 1}))
    study = Path(sys.executable).parent / "study"
    shell = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, capture_output=True, text=True, env=shell, cwd=tmp_path, timeout=300
        )

    trained = run([str(study), "trial", "--space", str(space), "--out", "trials"])
    assert trained.returncode == 0, trained.stdout + trained.stderr
    hint = trained.stdout.strip().splitlines()[-1].partition("into MLflow with: ")[2]
    assert hint == f"{study} import trials", trained.stdout
    imported = run(["sh", "-c", hint])
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert (tmp_path / "studies" / "mlflow.db").is_file()
