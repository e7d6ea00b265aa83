"""Sequence tasks and their explicit registry: one module per task, one line per task here."""

from __future__ import annotations

from typing import Any

from study.tasks.base import Task
from study.tasks.copying import Copying
from study.tasks.permuted_mnist import PermutedMNIST
from study.tasks.pixel_mnist import PixelMNIST

TASKS: dict[str, type[Task]] = {
    "copying": Copying,
    "pixel_mnist": PixelMNIST,
    "permuted_mnist": PermutedMNIST,
}


def make_task(name: str, options: dict[str, Any], seed: int) -> Task:
    """Build a task; `permutation_seed: seed` means the trial's own seed (authors' behaviour)."""
    options = dict(options)
    if options.get("permutation_seed") == "seed":
        options["permutation_seed"] = seed
    return TASKS[name](**options)


__all__ = ["TASKS", "Task", "make_task"]
