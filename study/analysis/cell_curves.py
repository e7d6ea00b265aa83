"""Seed-aggregated curves: per cell (task x method x p x lr x clip), the median and the 25th/75th
percentiles over seeds of a metric at each logged step. MLflow has no such view (users have asked
since mlflow/mlflow#3762), so `study report` logs one run per cell with these as its metrics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from study.analysis.load import Trial
from study.analysis.text import format_clip, format_float, variant_label

# The curves aggregated, and the statistics logged for each (metric key: f"{metric}_{stat}").
METRICS = ("val/accuracy", "train/loss")
QUANTILES = {"q25": 25.0, "median": 50.0, "q75": 75.0}


@dataclass(frozen=True)
class CellCurve:
    """One metric of one cell over its seeds: at each step, the quantiles over the seeds that
    logged that step (a seed that diverged early stops counting after its last point)."""

    metric: str
    steps: np.ndarray
    quantiles: dict[str, np.ndarray]  # "q25" | "median" | "q75" -> values at steps
    seeds: np.ndarray  # how many seeds each step's quantiles are over


@dataclass(frozen=True)
class Cell:
    """A cell's identity as MLflow shows it: its name, params and the trials it aggregates."""

    name: str  # e.g. "copying T=100 | h-detach p=0.25 | lr=0.001 | clip=1"
    params: dict[str, str]
    trial_ids: tuple[str, ...]


def cells_of(trials: Sequence[Trial]) -> list[tuple[Cell, list[Trial]]]:
    """Finished trials grouped by cell, cells in a stable order."""
    groups: dict[tuple, list[Trial]] = defaultdict(list)
    for trial in trials:
        if trial.finished:
            groups[trial.cell].append(trial)
    result = []
    for key in sorted(groups, key=lambda k: tuple(str(part) for part in k)):
        members = sorted(groups[key], key=lambda t: t.seed)
        task, method, p_detach, lr, clip = key
        name = (
            f"{task} | {variant_label(method, p_detach)} | lr={format_float(lr)} | "
            f"clip={format_clip(clip)}"
        )
        params = {
            "task": task,
            "method": method,
            "p_detach": format_float(p_detach),
            "lr": format_float(lr),
            "clip_norm": format_clip(clip),
            "seeds": str(len(members)),
        }
        result.append((Cell(name, params, tuple(t.trial_id for t in members)), members))
    return result


def aggregate(metric: str, curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> CellCurve:
    """Quantiles over seeds at every step any seed logged; NaN points (a diverged loss) are left
    out of that step's quantiles, and a step no finite value reaches is dropped."""
    steps = np.array(sorted({int(s) for steps, _ in curves for s in steps}), dtype=np.int64)
    table = np.full((len(curves), len(steps)), np.nan)
    position = {int(step): i for i, step in enumerate(steps)}
    for row, (seed_steps, values) in enumerate(curves):
        for step, value in zip(seed_steps, values, strict=True):
            table[row, position[int(step)]] = value
    table[~np.isfinite(table)] = np.nan
    counts = np.sum(np.isfinite(table), axis=0)
    keep = counts > 0
    table, steps, counts = table[:, keep], steps[keep], counts[keep]
    quantiles = {
        name: np.nanpercentile(table, q, axis=0) if table.size else np.array([])
        for name, q in QUANTILES.items()
    }
    return CellCurve(metric, steps, quantiles, counts)


def cell_metrics(
    members: Sequence[Trial], losses: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, list[tuple[int, float]]]:
    """A cell's logged metrics: f"{metric}_{q25|median|q75}" -> [(step, value)], from its
    trials' val curves and their train/loss histories (by run id)."""
    curves = {
        "val/accuracy": [(t.val_steps, t.val_acc) for t in members],
        "train/loss": [losses[t.run_id] for t in members if t.run_id in losses],
    }
    metrics = {}
    for metric, series in curves.items():
        if not series:
            continue
        curve = aggregate(metric, series)
        for name, values in curve.quantiles.items():
            metrics[f"{metric}_{name}"] = list(
                zip(curve.steps.tolist(), values.tolist(), strict=True)
            )
    return metrics
