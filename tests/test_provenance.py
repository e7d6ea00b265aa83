"""Where a study's code came from: the package version and the checkout's commit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from study import provenance


def test_version_and_commit_of_this_checkout() -> None:
    assert provenance.version()  # "unknown" only outside an installed package
    commit = provenance.git_commit()  # the tests run in a git checkout
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit), commit


def test_a_copy_inside_another_repository_records_no_commit(tmp_path: Path) -> None:
    """A non-editable install in a venv inside the user's own project: their HEAD is not ours."""
    other = tmp_path / "project"
    package = other / "venv" / "lib" / "study"
    shutil.copytree(
        Path(provenance.__file__).parent, package, ignore=shutil.ignore_patterns("*.pyc")
    )
    git = ["git", "-C", str(other), "-c", "user.name=u", "-c", "user.email=u@x"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    (other / "README").write_text("theirs\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-qm", "theirs"], check=True)
    code = "from study import provenance; print(provenance.git_commit())"
    ran = subprocess.run([sys.executable, "-c", code], cwd=package.parent, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert ran.stdout.strip() == "None", ran.stdout + ran.stderr
