"""Where a study's code came from: the package version and the checkout's commit."""

from __future__ import annotations

import re

from study import provenance


def test_version_and_commit_of_this_checkout() -> None:
    assert provenance.version()  # "unknown" only outside an installed package
    commit = provenance.git_commit()  # the tests run in a git checkout
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit), commit
