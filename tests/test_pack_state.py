"""A pack's state file: written whole, read back by trial id, and refused to a process whose
LSTM cells round otherwise than those that computed it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from study.config import TrialConfig
from study.errors import ConfigError
from study.pack_state import StateError, cells_used, load_state, save_state

STATES = {"t0000": {"status": "running", "iteration": 10, "latest": {"a": 1.0}, "state": None}}


def test_a_state_reads_back_whole_and_leaves_no_partial_file(tmp_path: Path) -> None:
    state_file = tmp_path / ".state" / "p0000.pt"
    assert load_state(state_file, ["t0000"]) == {}  # nothing saved yet
    save_state(state_file, STATES, "compiled")
    assert load_state(state_file, ["t0000"], "compiled") == STATES
    assert [p.name for p in state_file.parent.iterdir()] == ["p0000.pt"]


@pytest.mark.parametrize(
    "before,now,fix",
    [
        ("compiled", "torch", "unset HDETACH_CPU_CELLS and have a C compiler (gcc) to continue"),
        ("torch", "compiled", "set HDETACH_CPU_CELLS=torch to continue"),
    ],
)
def test_a_state_of_the_other_cells_is_refused_naming_what_continues_it(
    tmp_path: Path, before: str, now: str, fix: str
) -> None:
    state_file = tmp_path / "p0000.pt"
    save_state(state_file, STATES, before)
    with pytest.raises(ConfigError) as refused:
        load_state(state_file, ["t0000"], now)
    assert str(refused.value) == (
        f"{state_file}: computed with the {before} LSTM cells, and this process has the {now} "
        f"ones; they round differently, so the continued curve would reproduce no run: {fix} it"
    )


def test_states_without_cells_on_either_side_load(tmp_path: Path) -> None:
    state_file = tmp_path / "p0000.pt"
    torch.save({"members": STATES}, state_file)  # written before the cells were recorded
    assert load_state(state_file, ["t0000"], "torch") == STATES
    save_state(state_file, STATES, None)  # a CUDA pack's: no CPU cells ran
    assert load_state(state_file, ["t0000"], "compiled") == STATES
    save_state(state_file, STATES, "compiled")
    assert load_state(state_file, ["t0000"], None) == STATES


def test_cells_are_those_of_a_cpu_trial_here() -> None:
    assert cells_used(TrialConfig(device="cpu")) == "compiled"


@pytest.mark.parametrize(
    "content",
    [b"PK\x03\x04 half a zip", b"", b"not a torch file at all"],
    ids=["cut", "empty", "junk"],
)
def test_a_damaged_state_is_one_line_naming_the_file(tmp_path: Path, content: bytes) -> None:
    state_file = tmp_path / "p0003.pt"
    state_file.write_bytes(content)
    with pytest.raises(StateError) as refused:
        load_state(state_file, ["t0000"], "compiled")
    message = str(refused.value)
    assert message.startswith(f"{state_file}: damaged saved state (") and "\n" not in message
    assert message.endswith(
        "; put back an intact copy, or delete it to train p0003 again from its start"
    )


def test_a_state_of_another_shape_is_damaged(tmp_path: Path) -> None:
    state_file = tmp_path / "p0000.pt"
    torch.save({"something": 1}, state_file)
    with pytest.raises(StateError, match="damaged saved state"):
        load_state(state_file, ["t0000", "t0001"], "compiled")
