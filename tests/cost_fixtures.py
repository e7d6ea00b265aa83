"""Cost tables and plans the estimate tests share (tests/test_costs.py, tests/test_cost_text.py):
a table in the cost-table contract with copying T=5 entries, and a small plan it prices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import tiny_copying, write_space

from study.space import make_plan
from study.spec import load_spec


def entry(members: int, ms: float, **changes: Any) -> dict[str, Any]:
    """A copying T=5 entry (25 steps, H=8, B=10, tf32), eval 1 ms per member and batch."""
    values = {
        "shape": "copying",
        "steps": 25,
        "hidden": 8,
        "batch": 10,
        "members": members,
        "precision": "tf32",
        "kernel": "Triton rows",
        "ms_per_pack_step": ms,
        "ms_per_trial_step": ms / members,
        "cudnn_step_ms": 4.0,
        "eval_ms_per_pack_batch": float(members),
    }
    return {**values, **changes}


def table_json(gpu: str = "h200", entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "gpu": gpu,
        "device_name": "Test GPU",
        "sms": 132,
        "measured_on": "2026-12-01",
        "torch": "2.14.1",
        "commit": "abc1234",
        "command": "python benchmarks/pack_sweep.py",
        "source": "benchmarks/pack_sweep.py",
        # Pack sizes 1, 4, 8 at 2, 5, 9 ms per pack step; one fp32 entry.
        "entries": entries
        if entries is not None
        else [entry(1, 2.0), entry(4, 5.0), entry(8, 9.0), entry(1, 3.0, precision="fp32")],
    }


def write_table(folder: Path, raw: Any, gpu: str = "h200") -> Path:
    path = folder / f"{gpu}.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


def small_plan(tmp_path: Path, pack: int, **overrides: Any) -> Any:
    """4 copying trials (2 methods x 2 seeds), T=5 (25 steps), 720,000 iterations, on a GPU
    where there is one (a trial pinned to the CPU is not priced)."""
    body = tiny_copying(
        fixed={"iterations": 720_000, "eval_every": 1000, "device": "auto"},
        resources={"pack": pack},
        **overrides,
    )
    return make_plan(load_spec(write_space(tmp_path, "small", body)))
