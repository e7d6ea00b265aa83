"""Where a study's code came from: the package version and the git commit (torch- and Ray-free)."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path


def version() -> str:
    """The installed hdetach-study version; "unknown" when it runs from an uninstalled tree."""
    try:
        return metadata.version("hdetach-study")
    except metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The checkout's commit, with "-dirty" when it has uncommitted changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        top = Path(_git(here, "rev-parse", "--show-toplevel")).resolve()
        # Only our own checkout: a non-editable install inside someone's repository (a venv in
        # their project) would otherwise record their commit as this code's.
        if top / "study" != here or 'name = "hdetach-study"' not in _pyproject(top):
            return None
        commit = _git(here, "rev-parse", "HEAD")
        dirty = _git(here, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()


def _pyproject(top: Path) -> str:
    try:
        return (top / "pyproject.toml").read_text()
    except OSError:
        return ""
