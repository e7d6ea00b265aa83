"""How to spell the commands a `study` command prints for the user to paste next (`study resume
...`, `study ui ...`, `mlflow ui ...`), so that they run as printed from the same shell.

The README's first command runs `.venv/bin/study` without activating the virtual environment;
a hint reading `study ui --output ...` would then answer "command not found". So a hint names
the program the way this process was started when PATH would not find that same script.
Standard library only: `study trial` prints hints on GPU machines that have no MLflow."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

STUDY = "study"


def program(name: str = STUDY) -> str:
    """The shell word that runs console script `name` (study, mlflow) from the shell this process
    was started in: the bare name when PATH finds the script next to this process's own `study`
    script (an activated environment, a system install, the Docker image), else that script's
    path as the user gave it (`.venv/bin/study`). Outside a `study` script (tests, `python -c`)
    there is nothing better than the bare name."""
    launched = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if launched is None or launched.name != STUDY:
        return name
    script = launched.with_name(name)
    if not script.is_file():
        return name
    found = shutil.which(name)
    if found is not None and Path(found).resolve() == script.resolve():
        return name
    return shlex.quote(str(script))
