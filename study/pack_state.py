"""A pack's saved state (`.state/PACK.pt`, Ray's TRIAL.pt): each member's last evaluation and
training state, written whole or not at all, read back only by a process whose LSTM cells
round as the ones that computed it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from study.config import TrialConfig
from study.errors import ConfigError
from study.models import cpu_cells
from study.trial import resolve_device


def cells_used(config: TrialConfig) -> str | None:
    """The LSTM cells a trial of `config` runs here: compiled or torch on a CPU (they round
    differently), None on CUDA (its kernels are chosen by other switches, recorded as such)."""
    if resolve_device(config.device).type != "cpu":
        return None
    return cpu_cells.implementation()


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
    Refused (ConfigError) when the state was computed with other CPU cells than `cells`: the
    curve would be half one rounding, half the other, and reproduce neither run."""
    if not state_file.exists():
        return {}
    saved = torch.load(state_file, weights_only=True)
    if "members" not in saved and len(trial_ids) == 1:
        # A lone Ray trial's file as written before packs and trials shared this loop.
        state = saved["state"]
        lone = {"status": saved["status"], "iteration": state["iteration"], "latest": {}}
        return {trial_ids[0]: {**lone, "state": state}}
    before = saved.get("cpu_cells")  # absent in files written before it was recorded
    if before is not None and cells is not None and before != cells:
        raise ConfigError(_cells_changed(state_file, before, cells))
    return saved["members"]


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
