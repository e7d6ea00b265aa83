"""The study record (study.json): a folder copied or moved with its store, an unreadable one;
the driver lock."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from runner_fixtures import saved_state

from study.errors import ConfigError
from study.runner.state import STATE_FILE, StudyState


def test_a_study_folder_copied_or_moved_is_not_resumed_into_the_old_store(tmp_path: Path) -> None:
    saved_state(tmp_path / "first")
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    with pytest.raises(ConfigError) as raised:
        StudyState.load(tmp_path / "copy", "kept")
    assert str(raised.value) == (
        f"study kept: its MLflow store {tmp_path}/first/mlflow.db belongs to {tmp_path}/first, "
        f"not {tmp_path}/copy (MLflow keeps absolute paths); resume it with --output "
        f"{tmp_path}/first, moving the folder back first if it was moved"
    )
    assert StudyState.load(tmp_path / "first", "kept").parent_run_id == "parent-run-id"
    # A study logged to another store (a server, another SQLite file) may move freely.
    saved_state(tmp_path / "served", "http://127.0.0.1:5000")
    shutil.move(tmp_path / "served", tmp_path / "moved")
    assert StudyState.load(tmp_path / "moved", "kept").output == tmp_path / "moved"


@pytest.mark.parametrize("record", ['{"name": ', "{}", "[1, 2]"])
def test_an_unreadable_study_record_is_one_line(tmp_path: Path, record: str) -> None:
    saved_state(tmp_path / "out")
    path = tmp_path / "out" / "ray" / "kept" / STATE_FILE
    path.write_text(record)
    with pytest.raises(ConfigError) as raised:
        StudyState.load(tmp_path / "out", "kept")
    assert str(raised.value).startswith(f"{path}: not a readable study record (")
    assert "\n" not in str(raised.value)
