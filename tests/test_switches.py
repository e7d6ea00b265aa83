"""study/switches.py: the kernels' environment switches, their defaults and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from study.errors import ConfigError
from study.models import cpu_cells, cuda_graph, triton_lstm
from study.switches import SWITCHES, check_switches, switch, switches_set, switches_text

REPO = Path(__file__).resolve().parent.parent


def test_every_switch_the_kernels_read_is_registered() -> None:
    read = {
        cpu_cells.ENV_SWITCH,
        cuda_graph.ENV_SWITCH,
        *(getattr(triton_lstm, name) for name in dir(triton_lstm) if name.startswith("ENV_")),
    }
    assert read == set(SWITCHES)


def test_unset_switches_give_their_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    assert switch("HDETACH_TRITON_KERNEL") == "auto"
    assert triton_lstm.tuning(100) == (16, 8) and triton_lstm.tuning(64) == (16, 4)
    assert triton_lstm._split_units() == 16
    # tf32 split forward 8 warps (1.86 ms against 1.99 at 4 on an H100), its backward 4;
    # full fp32's barrier forward keeps 4.
    monkeypatch.setenv("HDETACH_TRITON_PRECISION", "tf32")
    assert triton_lstm._split_warps(backward=False) == 8
    assert triton_lstm._split_warps(backward=True) == 4
    monkeypatch.setenv("HDETACH_TRITON_PRECISION", "ieee")
    assert triton_lstm._split_warps(backward=False) == triton_lstm._split_warps(backward=True) == 4
    monkeypatch.delenv("HDETACH_TRITON_PRECISION")
    check_switches()
    # Tagged readers hold a whole step's words: 8 warps, but only 4 for the backward's partial
    # sums in tf32 (fewer words); full fp32's partial-sum product needs 8. Unless asked otherwise.
    monkeypatch.setenv("HDETACH_TRITON_SPLIT_SYNC", "tagged")
    assert triton_lstm._split_warps(backward=False) == triton_lstm._split_warps(backward=True) == 8
    monkeypatch.setenv("HDETACH_TRITON_SPLIT_BACKWARD", "partials")
    monkeypatch.setenv("HDETACH_TRITON_PRECISION", "tf32")
    assert triton_lstm._split_warps(backward=False) == 8
    assert triton_lstm._split_warps(backward=True) == 4
    monkeypatch.setenv("HDETACH_TRITON_PRECISION", "ieee")
    assert triton_lstm._split_warps(backward=True) == 8
    monkeypatch.setenv("HDETACH_TRITON_SPLIT_WARPS", "4")
    assert triton_lstm._split_warps(backward=False) == triton_lstm._split_warps(backward=True) == 4


def test_an_allowed_value_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HDETACH_TRITON_WARPS", "2")
    monkeypatch.setenv("HDETACH_TRITON_BLOCK_B", "32")
    monkeypatch.setenv("HDETACH_TRITON_PRECISION", "tf32x3")
    assert triton_lstm.tuning(100) == (32, 2)
    assert triton_lstm.precision() == "tf32x3"


@pytest.mark.parametrize(
    "name,value", [("HDETACH_TRITON_WARPS", "eight"), ("HDETACH_TRITON_KERNEL", "splt")]
)
def test_a_value_not_allowed_names_the_variable_and_the_choices(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        check_switches()
    message = str(raised.value)
    assert message.startswith(f"environment variable {name}={value!r}: allowed are ")
    assert "\n" not in message and ", ".join(SWITCHES[name]) in message


@pytest.mark.parametrize(
    "name,hint",
    [
        ("HDETACH_TRITON_SPLT_SYNC", "did you mean HDETACH_TRITON_SPLIT_SYNC?"),
        ("HDETACH_NONSENSE", "switches: HDETACH_CPU_CELLS, HDETACH_CUDA_GRAPHS, "),
    ],
)
def test_an_hdetach_name_that_is_no_switch_is_an_error(
    name: str, hint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, "tagged")
    with pytest.raises(ConfigError) as raised:
        check_switches()
    message = str(raised.value)
    assert message.startswith(f"environment variable {name}: no such switch ({hint}")
    assert "\n" not in message


def test_study_stops_on_a_mistyped_switch_before_any_work() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "study.cli", "trial", "--iterations", "5"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HDETACH_CUDA_GRAPHS": "off"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "study trial: error: environment variable HDETACH_CUDA_GRAPHS='off': allowed are 1, 0 "
        "(default 1)\n"
    )
    assert result.stdout == ""


def test_the_switches_set_are_recorded_as_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    assert switches_set() == {}
    monkeypatch.setenv("HDETACH_TRITON_KERNEL", "rows")
    monkeypatch.setenv("HDETACH_CUDA_GRAPHS", "0")
    monkeypatch.setenv("HDETACH_OTHER", "1")  # no switch: check_switches refuses it, not here
    forced = switches_set()
    assert forced == {"HDETACH_TRITON_KERNEL": "rows", "HDETACH_CUDA_GRAPHS": "0"}
    assert switches_text(forced) == "HDETACH_CUDA_GRAPHS=0 HDETACH_TRITON_KERNEL=rows"
