"""Matplotlib figures of a study: curves per seed, lr sensitivity, success heatmap, best-of-n.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot), which renders with the Agg
backend and touches no global backend state, so the report runs headless and in tests.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
from matplotlib.figure import Figure

from study.analysis.stats import TUNED, Analysis
from study.analysis.text import format_clip, format_float, variant_label

_DPI = 100
_SEED_COLORS = [f"C{i}" for i in range(10)]


def all_figures(analysis: Analysis) -> dict[str, Figure]:
    """Every figure of the report, keyed by its PNG file name."""
    figures = {}
    for task in analysis.tasks:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", task).strip("_")
        figures[f"{slug}_curves.png"] = curves_figure(analysis, task)
        cells = [c for c in analysis.cells if c.task == task and c.n]
        if cells:
            if all(c.lr != TUNED for c in cells):  # an Optuna study has no lr axis to draw
                figures[f"{slug}_lr_sensitivity.png"] = lr_sensitivity_figure(analysis, task)
            figures[f"{slug}_success_heatmap.png"] = success_heatmap_figure(analysis, task)
            figures[f"{slug}_expected_best.png"] = expected_best_figure(analysis, task)
    return figures


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def curves_figure(analysis: Analysis, task: str) -> Figure:
    """Val accuracy against iteration, one line per seed; rows lr x clip, columns methods.

    As the paper's Fig. 2, 3, 6 and 8, but every seed is drawn instead of the best one: a figure
    holds every trial of its plan. Running trials are dashed; a diverged run ends in a cross; a
    failed one is dotted up to where it failed (in the legend even with no point); a method of
    the plan with no trial yet has its column, marked so.
    """
    trials = [t for t in analysis.trials if t.task == task]
    variants = sorted(analysis.variants.get(task, []), key=_variant_order)  # planned ones too
    settings = sorted({(t.lr, t.clip_norm) for t in trials}, key=_setting_order)
    rows, cols = max(len(settings), 1), max(len(variants), 1)
    figure = Figure(figsize=(3.4 * cols, 2.5 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for r, (lr, clip) in enumerate(settings):
        for c, variant in enumerate(variants):
            ax = axes[r][c]
            panel = [
                t for t in trials if t.variant == variant and (t.lr, t.clip_norm) == (lr, clip)
            ]
            for trial in sorted(panel, key=lambda t: t.seed):
                color = _SEED_COLORS[trial.seed % len(_SEED_COLORS)]
                style = {"running": "--", "failed": ":"}.get(trial.state, "-")
                note = "" if trial.state == "completed" else f" ({trial.state})"
                ax.plot(
                    trial.val_steps,
                    trial.val_acc,
                    style,
                    color=color,
                    lw=1.2,
                    label=f"seed {trial.seed}{note}",
                )
                if trial.state in ("diverged", "failed") and len(trial.val_steps):
                    ax.plot(trial.val_steps[-1], trial.val_acc[-1], "x", color=color, ms=7)
            ax.axhline(analysis.study.target, color="grey", ls=":", lw=1)
            title = f"{variant_label(*variant)}, lr={format_float(lr)}, clip={format_clip(clip)}"
            ax.set_title(title, fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if panel:
                ax.legend(fontsize=7, loc="lower right")
            else:
                ax.text(0.5, 0.5, "no trial started", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="grey")  # fmt: skip
            if r == rows - 1:
                ax.set_xlabel("iteration")
            if c == 0:
                ax.set_ylabel("val accuracy")
    figure.suptitle(f"{task}: validation accuracy per seed (dotted: target)", fontsize=11)
    return figure


def lr_sensitivity_figure(analysis: Analysis, task: str) -> Figure:
    """Median best val accuracy against lr (bars: IQR over seeds), one panel per clip setting."""
    cells = [c for c in analysis.cells if c.task == task and c.n]
    clips = sorted({c.clip_norm for c in cells}, key=lambda x: (x is not None, x or 0))
    figure = Figure(figsize=(4.2 * len(clips), 3.2), layout="constrained")
    axes = figure.subplots(1, len(clips), squeeze=False, sharey=True)[0]
    for ax, clip in zip(axes, clips, strict=True):
        for variant in sorted({c.variant for c in cells}, key=_variant_order):
            line = sorted(
                (c for c in cells if c.variant == variant and c.clip_norm == clip),
                key=lambda c: c.lr,
            )
            if not line:
                continue
            lrs = [c.lr for c in line]
            median = np.array([c.best.median for c in line])
            errors = [median - [c.best.q25 for c in line], [c.best.q75 for c in line] - median]
            ax.errorbar(
                lrs, median, yerr=errors, marker="o", capsize=3, label=variant_label(*variant)
            )
        ax.set_xscale("log")
        ax.set_title(f"clip={format_clip(clip)}", fontsize=10)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("best val accuracy (median, IQR)")
    figure.suptitle(f"{task}: learning-rate sensitivity", fontsize=11)
    return figure


def success_heatmap_figure(analysis: Analysis, task: str) -> Figure:
    """Success rate over seeds on the lr x clip grid, one panel per method; text = k/n."""
    cells = [c for c in analysis.cells if c.task == task and c.n]
    variants = sorted({c.variant for c in cells}, key=_variant_order)
    lrs = sorted({c.lr for c in cells})
    clips = sorted({c.clip_norm for c in cells}, key=lambda x: (x is not None, x or 0))
    figure = Figure(
        figsize=(1.0 + 1.1 * len(lrs) * len(variants), 1.4 + 0.6 * len(clips)),
        layout="constrained",
    )
    axes = figure.subplots(1, len(variants), squeeze=False, sharey=True)[0]
    image = None
    for ax, variant in zip(axes, variants, strict=True):
        grid = np.full((len(clips), len(lrs)), np.nan)
        for cell in (c for c in cells if c.variant == variant):
            row, col = clips.index(cell.clip_norm), lrs.index(cell.lr)
            grid[row, col] = cell.success_rate
            ax.text(
                col,
                row,
                f"{cell.successes}/{cell.n}",
                ha="center",
                va="center",
                color="white" if cell.success_rate < 0.6 else "black",
                fontsize=9,
            )
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lrs)), [format_float(lr) for lr in lrs], rotation=45, fontsize=8)
        ax.set_yticks(range(len(clips)), [format_clip(clip) for clip in clips], fontsize=8)
        ax.set_title(variant_label(*variant), fontsize=10)
        ax.set_xlabel("learning rate")
    axes[0].set_ylabel("clip norm")
    figure.colorbar(image, ax=list(axes), label="success rate")
    figure.suptitle(f"{task}: runs reaching val accuracy {analysis.study.target:g}", fontsize=11)
    return figure


def expected_best_figure(analysis: Analysis, task: str) -> Figure:
    """Expected best val accuracy after n random trials (band: +-1 std), per method."""
    figure = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = figure.subplots()
    for curve in sorted(
        (e for e in analysis.expected_best if e.task == task),
        key=lambda e: _variant_order((e.method, e.p_detach)),
    ):
        n = np.arange(1, len(curve.mean) + 1)
        mean, std = np.array(curve.mean), np.array(curve.std)
        ax.plot(n, mean, marker=".", label=variant_label(curve.method, curve.p_detach))
        ax.fill_between(n, mean - std, np.minimum(mean + std, 1.0), alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("number of random trials (lr, clip, seed)")
    ax.set_ylabel("expected best val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{task}: expected best of n trials (Dodge et al. 2019)", fontsize=10)
    return figure


def _variant_order(variant: tuple[str, float]) -> tuple:
    return (variant[0] != "none", *variant)


def _setting_order(setting: tuple[float, float | None]) -> tuple:
    lr, clip = setting
    return (lr, clip is not None, clip if clip is not None else -math.inf)
