"""How a pack's trials are laid out on a GPU by the split kernels, and how many fit at once.

No torch, no triton: `study plan` sizes packs (`resources.pack: auto`) on a machine without a
GPU, and the kernels (study/models/triton_split.py) pick their launch from the same numbers.

A split program owns `rows` batch rows x `units` hidden units of one trial for the whole time
loop and waits every step for the other programs of its trial (never for another trial's), so
every program of a launch must be resident at once: one per SM, as triton_split.fits() has
always assumed. A trial's programs = cdiv(hidden, units) x cdiv(batch, rows). Few rows per
program (16) give one trial the most SMs, hence the shortest chain of dependent work per step;
all rows in one program (a "wide" layout) give each trial only cdiv(hidden, units) programs, so
a whole GPU holds many trials that step together in about one trial's time (issue 18).
"""

from __future__ import annotations

from dataclasses import dataclass

ROW_CHOICES = (16, 32, 64, 128)  # rows per program: tl.dot's M, a power of two from 16
UNITS = 16  # hidden units per program (the split kernels' default, triton_split.BLOCK_UNITS)
MAX_HIDDEN = 128  # the split kernels hold a whole (rows x 128) h tile as one tl.dot operand

# The most rows per program whose split kernels compile for an H100 (sm_90, Triton 3.8)
# without spilling registers, by tl.dot precision and exchange (tests/test_triton_split.py
# compiles each; registers and spills per layout: triton_split.WIDE_WARPS). One row wider
# spills, at every warp count from 4 to 16 (bytes a thread, the least over warps, H = 100):
# tf32 with the barrier: none wider (128 is the widest choice); tagged at 128: the forward 328,
# the backward 280; tf32x3 (three products) at 64 with the barrier: the forward 608 (tagged,
# oddly, none), tagged at 128: 416; full fp32 ("ieee", whose four FMA products hold W in
# registers) at 64: the forward 720, the backward 560; tagged at 32: the forward 208.
# This table is Triton 3.8's, the one CI compiles with. The GPU image's Triton 3.6 (torch 2.11;
# benchmarks/kernel_sass.py with PYTHONPATH at a 3.6 install, 2026-12-02) compiles every layout
# in it with at most 16 bytes spilled, but one: tf32x3 tagged at 64 rows, whose backward spills
# 152 at 8 warps (slower, not wrong). It would also take full fp32 one row wider (64 rows at 16
# warps, nothing spilled).
WIDEST_ROWS = {
    ("tf32", "barrier"): 128,
    ("tf32", "tagged"): 64,
    ("tf32x3", "barrier"): 32,
    ("tf32x3", "tagged"): 64,
    ("ieee", "barrier"): 32,
    ("ieee", "tagged"): 16,
}


@dataclass(frozen=True)
class GpuModel:
    key: str  # how users and cost tables name it: h100, h200, ...
    name: str
    sms: int


# The GPUs a plan can be sized for by name (`--gpu`); a local CUDA device is read directly.
KNOWN_GPUS = {
    "h100": GpuModel("h100", "NVIDIA H100 SXM (80 GB)", 132),
    "h200": GpuModel("h200", "NVIDIA H200", 132),
    "a100": GpuModel("a100", "NVIDIA A100", 108),
}
# `--gpu none`: plan as a machine without a GPU does (`pack: auto` is 1). The commands that
# `study plan --commands` prints carry it for such a plan, so that a job on a GPU node trains
# the packs the plan listed, not ones sized for that node's GPU.
NO_GPU = "none"


@dataclass(frozen=True)
class Layout:
    rows: int  # batch rows per program
    units: int  # hidden units per program

    def programs(self, batch: int, hidden: int) -> int:
        """Programs one trial of this shape takes."""
        return -(-hidden // self.units) * -(-batch // self.rows)


def widest_rows(precision: str, sync: str = "barrier") -> int:
    """WIDEST_ROWS for a tl.dot precision ("ieee", "tf32", "tf32x3") or a trial's ("fp32",
    "tf32"), and the split kernels' exchange ("barrier", "tagged")."""
    return WIDEST_ROWS[("ieee" if precision == "fp32" else precision, sync)]


def layouts(batch: int, units: int = UNITS, max_rows: int = ROW_CHOICES[-1]) -> list[Layout]:
    """The layouts worth trying for a batch size, most programs per trial first (rows beyond
    the padded batch add nothing), up to `max_rows` rows per program."""
    padded = 16
    while padded < batch and padded < max_rows:
        padded *= 2
    return [Layout(rows, units) for rows in ROW_CHOICES if rows <= padded]


def choose_layout(
    members: int,
    batch: int,
    hidden: int,
    sms: int,
    units: int = UNITS,
    max_rows: int = ROW_CHOICES[-1],
) -> Layout | None:
    """The layout with the most programs per trial whose whole launch stays resident (one
    program per SM), or None: then the row kernels run (triton_lstm.py)."""
    if hidden > MAX_HIDDEN:
        return None
    for layout in layouts(batch, units, max_rows):
        if members * layout.programs(batch, hidden) <= sms:
            return layout
    return None


def resident_pack(batch: int, hidden: int, sms: int, max_rows: int = ROW_CHOICES[-1]) -> int:
    """`pack: auto` on a GPU with `sms` SMs: the most trials of this shape whose programs are
    all resident at once (the widest layout, up to `max_rows` rows: widest_rows(precision)),
    at least 1 (a trial too big for the split kernels takes the row kernels alone)."""
    if hidden > MAX_HIDDEN:
        return 1
    widest = layouts(batch, max_rows=max_rows)[-1]
    return max(1, sms // widest.programs(batch, hidden))
