"""Environment switches of the LSTM kernels (speed comparisons, debugging): values checked."""

from __future__ import annotations

import difflib
import os

from study.errors import ConfigError

# name -> allowed values, the default first. None of these changes a curve's math; each picks how
# it is computed (and so the last bits of a float, as README "Performance" says).
SWITCHES: dict[str, tuple[str, ...]] = {
    # Pointwise LSTM-cell work on a CPU: compiled C (study/models/lstm_cells.c) or torch ops.
    "HDETACH_CPU_CELLS": ("compiled", "torch"),
    # 0: every CUDA training step runs eagerly instead of replaying one captured CUDA graph.
    "HDETACH_CUDA_GRAPHS": ("1", "0"),
    # 0: the per-step CUDA path (one GEMM + fused cell kernels per step) instead of Triton.
    "HDETACH_TRITON": ("1", "0"),
    # Triton kernels: split over hidden units where every program fits at once, or batch rows.
    "HDETACH_TRITON_KERNEL": ("auto", "split", "rows"),
    # How split programs hand each other a step's h (and the backward's share): a counter
    # barrier, or values tagged with their step number (study/models/triton_split.py, exchange()).
    # The defaults of these two stay: on an H100 tagged + partials measured as fast (pixel MNIST
    # 5.12 ms against 5.15 per forward + backward; copying 0.93 both) and either alone slower
    # (benchmarks/results/h100.txt), so the simpler protocol runs.
    "HDETACH_TRITON_SPLIT_SYNC": ("barrier", "tagged"),
    # What split programs hand each other in the backward: every unit block's gate gradients, or
    # partial sums of the h gradient (study/models/triton_split.py, backward()).
    "HDETACH_TRITON_SPLIT_BACKWARD": ("gates", "partials"),
    # tl.dot precision; auto follows torch.backends.cuda.matmul.allow_tf32 (a trial's precision).
    "HDETACH_TRITON_PRECISION": ("auto", "ieee", "tf32", "tf32x3"),
    # Tuning for benchmark sweeps: batch rows and warps per row-kernel program (auto: 8 warps
    # for H > 64, else 4), hidden units and warps per split program (auto:
    # triton_split.default_warps), fp32 reduction slice.
    "HDETACH_TRITON_BLOCK_B": ("16", "32", "64"),
    "HDETACH_TRITON_WARPS": ("auto", "1", "2", "4", "8", "16"),
    "HDETACH_TRITON_SPLIT_UNITS": ("16", "32"),
    "HDETACH_TRITON_SPLIT_ROWS": ("auto", "16", "32", "64", "128"),  # auto: choose_layout
    "HDETACH_TRITON_SPLIT_WARPS": ("auto", "1", "2", "4", "8"),
    "HDETACH_TRITON_IEEE_SLICE": ("16", "32"),
}


def switch(name: str) -> str:
    """The switch's value from the environment, or its default; a one-line error if not allowed."""
    allowed = SWITCHES[name]
    value = os.environ.get(name, allowed[0])
    if value not in allowed:
        raise ConfigError(
            f"environment variable {name}={value!r}: allowed are {', '.join(allowed)} "
            f"(default {allowed[0]})"
        )
    return value


def check_switches() -> None:
    """Check every switch set in the environment, before any work starts; an HDETACH_* name that
    is no switch (a typo would otherwise leave the default in force, unseen) is an error too."""
    for name in sorted(os.environ):
        if name.startswith("HDETACH_") and name not in SWITCHES:
            # Compared without the shared prefix, which would make every name look close.
            suffixes = {switch_name[len("HDETACH_") :]: switch_name for switch_name in SWITCHES}
            close = difflib.get_close_matches(name[len("HDETACH_") :], suffixes, n=1)
            hint = (
                f"did you mean {suffixes[close[0]]}?"
                if close
                else f"switches: {', '.join(SWITCHES)}"
            )
            raise ConfigError(f"environment variable {name}: no such switch ({hint})")
    for name in SWITCHES:
        switch(name)


def switches_set() -> dict[str, str]:
    """The switches set in this process's environment, as a trial records them: each picks how a
    curve is computed, and so its last bits, which a record without them could not explain."""
    return {name: os.environ[name] for name in SWITCHES if name in os.environ}


def switches_text(values: dict[str, str]) -> str:
    """Set switches as one would type them before a command (the `switches.set` tag)."""
    return " ".join(f"{name}={value}" for name, value in sorted(values.items()))
