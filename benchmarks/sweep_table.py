"""What one run of benchmarks/pack_sweep.py measured, and the cost table written from it.

A Point is one pack (shape, precision, K); a Sweep holds every point's answer, the cuDNN
baselines, the evaluation costs and why a point failed or was skipped, in the order the run
went. write_tables turns it into the cost table that study/costs.py reads
(benchmarks/results/<gpu>.json; its fields are costs.TABLE_FIELDS), rewritten after every
measured point, so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep_measure import SWEEP_SHAPES

from study.models import triton_lstm
from study.pack_layout import KNOWN_GPUS, choose_layout, resident_pack, widest_rows

REPO = Path(__file__).resolve().parent.parent
ROWS_SWITCH = "HDETACH_TRITON_SPLIT_ROWS"  # a forced split layout (triton_split), if set


@dataclass(frozen=True)
class Point:
    """One pack the sweep measures: K trials (members) of one shape at one precision."""

    shape: str
    precision: str
    members: int
    # This K is `auto` (resident_pack) on this device: a label, not part of the point's identity.
    auto: bool = field(default=False, compare=False)


@dataclass
class Sweep:
    """Everything one run measured, failed or skipped, in the order it happened."""

    args: argparse.Namespace
    device_name: str
    sms: int
    torch_version: str
    started: float = field(default_factory=time.monotonic)
    packs: dict[Point, dict[str, Any]] = field(default_factory=dict)  # measured points
    cudnn: dict[str, float] = field(default_factory=dict)  # shape -> ms
    eval_member: dict[tuple[str, str], float] = field(default_factory=dict)  # ms per member
    notes: dict[Point, str] = field(default_factory=dict)  # failed or skipped: why
    failures: int = 0

    @property
    def cuda(self) -> bool:
        return self.args.device == "cuda"

    @property
    def gpu(self) -> str:
        return gpu_key(self.device_name) if self.cuda else "cpu"

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def gpu_key(device_name: str) -> str:
    """A cost table's GPU name: a KNOWN_GPUS key found in the device name ("NVIDIA H200" ->
    h200), else the name lowercased without anything but letters and digits."""
    for key in KNOWN_GPUS:
        if re.search(rf"\b{key}\b", device_name, flags=re.IGNORECASE):
            return key
    return re.sub(r"[^a-z0-9]", "", device_name.lower())


def table_paths(tables: list[str] | None, gpu: str, cuda: bool) -> list[Path]:
    """Where the table goes: each --table (a .json file, or a folder given <gpu>.json); by
    default benchmarks/results/<gpu>.json on a GPU and nowhere on a CPU."""
    if not tables:
        return [REPO / "benchmarks" / "results" / f"{gpu}.json"] if cuda else []
    return [Path(t) if t.endswith(".json") else Path(t) / f"{gpu}.json" for t in tables]


def sizes(sweep: Sweep, shape: str, precision: str) -> list[tuple[int, bool]]:
    """(K, is auto) for a shape, ascending, each K once (auto may equal a listed one). auto is
    `pack: auto` at this precision: full fp32 spills beyond 32 rows a program, so fewer fit."""
    _, _, batch, hidden, _, _ = SWEEP_SHAPES[shape]
    rows = widest_rows(precision)
    wanted = "auto" in sweep.args.members
    auto = resident_pack(batch, hidden, sweep.sms, rows) if wanted else None
    listed = {int(v) for v in sweep.args.members if v != "auto"}
    return sorted({(k, k == auto) for k in listed | ({auto} if auto else set())})


def predicted_layout(sweep: Sweep, shape: str, members: int, precision: str) -> str:
    """The split layout pack_layout chooses for this pack (rows x units per program and the
    SMs its programs take), or where none fits: the row kernels (tf32) or per-step (fp32)."""
    if not sweep.cuda:
        return "-"
    forced = os.environ.get(ROWS_SWITCH, "auto")
    if forced != "auto":
        return f"forced {forced} rows"
    if os.environ.get(triton_lstm.ENV_KERNEL) == "rows":
        return "rows (forced)"
    _, _, batch, hidden, _, _ = SWEEP_SHAPES[shape]
    layout = choose_layout(members, batch, hidden, sweep.sms, max_rows=widest_rows(precision))
    if layout is None:
        return "none fits"
    used = members * layout.programs(batch, hidden)
    return f"{layout.rows}x{layout.units} {used}/{sweep.sms}"


def entries(sweep: Sweep) -> list[dict[str, Any]]:
    """The measured points as the cost table's entries."""
    rows = []
    for point, result in sorted(
        sweep.packs.items(), key=lambda item: (item[0].shape, item[0].precision, item[0].members)
    ):
        _, seq_len, batch, hidden, _, _ = SWEEP_SHAPES[point.shape]
        member_eval = sweep.eval_member.get((point.shape, point.precision))
        rows.append(
            {
                "shape": point.shape,
                "steps": seq_len,
                "hidden": hidden,
                "batch": batch,
                "members": point.members,
                "precision": point.precision,
                "kernel": result["kernel"],
                "ms_per_pack_step": round(result["ms"], 4),
                "ms_per_trial_step": round(result["ms"] / point.members, 4),
                "cudnn_step_ms": _rounded(sweep.cudnn.get(point.shape)),
                "eval_ms_per_pack_batch": _rounded(
                    None if member_eval is None else member_eval * point.members
                ),
                "start_ms": _rounded(result.get("start_ms")),
            }
        )
    return rows


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def checkout_commit() -> str:
    """The checked-out commit, with "+changes" where the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def write_tables(sweep: Sweep, paths: list[Path], commit: str) -> None:
    if not sweep.packs:
        return
    table = {
        "gpu": sweep.gpu,
        "device_name": sweep.device_name,
        "sms": sweep.sms,
        "measured_on": datetime.date.today().isoformat(),
        "torch": sweep.torch_version,
        "commit": commit,
        "command": shlex.join(["python", "benchmarks/pack_sweep.py", *sys.argv[1:]]),
        "source": "benchmarks/pack_sweep.py",
        "entries": entries(sweep),
    }
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        partial.replace(path)
