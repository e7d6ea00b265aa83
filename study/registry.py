"""The checks of a trial's registered names, in one place above the registries: its task and
method must be in TASKS and METHODS, and its task options must suit its task."""

from __future__ import annotations

from typing import Any

from study.errors import ConfigError
from study.methods import METHODS
from study.tasks import TASKS


def check_registered(task: str, method: str, task_options: dict[str, Any]) -> None:
    """Raise ConfigError (one line, naming the field and what is allowed) for an unknown task or
    method, or options the task refuses. TrialConfig validation calls it on every config."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if method not in METHODS:
        raise ConfigError(f"method: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    TASKS[task].check_options(task_options)
