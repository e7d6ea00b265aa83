"""A pack's saved state (`.state/PACK.pt`, Ray's TRIAL.pt): each member's last evaluation and
training state, written whole or not at all, read back only by a process whose LSTM cells
round as the ones that computed it."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from study.config import TrialConfig
from study.errors import ConfigError, one_line
from study.models import cpu_cells
from study.trial import resolve_device


class StateError(ConfigError):
    """A saved state that must not be continued: said in one line, the files left as they are."""


def cells_used(config: TrialConfig) -> str | None:
    """The LSTM cells a trial of `config` runs here (cpu_cells.implementation)."""
    return cpu_cells.implementation(resolve_device(config.device))


def save_state(
    state_file: Path, states: dict[str, dict[str, Any]], cells: str | None = None
) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    partial = state_file.with_name(f".{state_file.name}.{os.getpid()}.partial")
    torch.save({"members": states, "cpu_cells": cells}, partial)
    os.replace(partial, state_file)  # a killed process never leaves half a file


def load_state(
    state_file: Path, trial_ids: Sequence[str], cells: str | None = None
) -> dict[str, dict[str, Any]]:
    """Each member's last saved {status, iteration, latest, state}, by trial id (those of the
    pack, `trial_ids`); {} if none.

    Refused (StateError, before anything is trained or written) when the file is damaged, or
    was computed with other CPU cells than `cells`: the curve would be half one rounding, half
    the other, and reproduce neither run."""
    if not state_file.exists():
        return {}
    try:
        saved = torch.load(state_file, weights_only=True)
        if "members" not in saved and len(trial_ids) == 1:
            # A lone Ray trial's file as written before packs and trials shared this loop.
            state = saved["state"]
            lone = {"status": saved["status"], "iteration": state["iteration"], "latest": {}}
            return {trial_ids[0]: {**lone, "state": state}}
        members = dict(saved["members"])
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as error:
        # A truncated copy, a disk error: a restart would throw away the curve its result files
        # hold, so the user decides (torch's own message names no file).
        raise StateError(
            f"{state_file}: damaged saved state ({one_line(error)}); put back an intact copy, "
            f"or delete it to train {state_file.stem} again from its start"
        ) from None
    before = saved.get("cpu_cells")  # absent in files written before it was recorded
    if before is not None and cells is not None and before != cells:
        raise StateError(_cells_changed(state_file, before, cells))
    return members


def _cells_changed(state_file: Path, before: str, now: str) -> str:
    fix = (
        f"set {cpu_cells.ENV_SWITCH}=torch to continue it"
        if before == "torch"
        else f"unset {cpu_cells.ENV_SWITCH} and have a C compiler (gcc) to continue it"
    )
    return (
        f"{state_file}: computed with the {before} LSTM cells, and this process has the {now} "
        f"ones; they round differently, so the continued curve would reproduce no run: {fix}"
    )
