"""How the report writes numbers and names, each defined once: method labels, lr and clip
values, percents, intervals, spreads over seeds and iteration counts."""

from __future__ import annotations

import math

from study.analysis.stats import TUNED, TUNED_LABEL, Spread


def variant_label(method: str, p_detach: float) -> str:
    """Human name of a compared method: "vanilla", "h-detach p=0.25", "h-detach p=tuned"."""
    if method == "none":
        return "vanilla"
    return f"{method.replace('_', '-')} p={format_float(p_detach)}"


def format_float(value: float) -> str:
    """A cell's lr or p_detach as the report shows it: "0.001", or "tuned" (Optuna)."""
    return TUNED_LABEL if value == TUNED else f"{value:g}"


def format_clip(clip: float | None) -> str:
    """A clip norm as the report shows it: "1", "none" (no clipping) or "tuned"."""
    return "none" if clip is None else format_float(clip)


def json_value(value: float | None) -> float | str | None:
    """A cell value for cells.csv and summary.json: the number, or "tuned"."""
    return TUNED_LABEL if value == TUNED else value


def lr_range_text(lrs: tuple[float, float] | None) -> str:
    if lrs is None:
        return "no lr"
    low, high = format_float(lrs[0]), format_float(lrs[1])
    return f"lr {low} only" if low == high else f"lr {low} to {high}"


def decades_text(value: float) -> str:
    return "no good lr" if math.isnan(value) else f"{value:.1f} decades"


def percent_text(value: float) -> str:
    return f"{100 * value:g}%"


def number_text(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def interval_text(ci: tuple[float, float]) -> str:
    if any(math.isnan(x) for x in ci):
        return "[no interval]"
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def spread_text(s: Spread) -> str:
    if math.isnan(s.median):
        return "n/a"
    return f"{s.median:.3f} [{s.q25:.3f}, {s.q75:.3f}] {s.min:.3f}"


def iterations_text(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return ">budget" if math.isinf(value) else f"{value:g}"


def variant_name(method: str) -> str:
    """A method as a claim names it: "vanilla", "h-detach", "c-detach"."""
    return "vanilla" if method == "none" else method.replace("_", "-")


def seed_range(seeds: tuple[int, ...]) -> str:
    """Seeds as "0-4" when consecutive, else listed: "0, 2, 5"."""
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def budget_text(fraction: float) -> str:
    """A run's budget against its space file's iterations (the paper's, for a paper space):
    "budget 100% of the space file's iterations", "budget 0.4% ..."."""
    if math.isnan(fraction):
        return "budget unknown (the space fixes no iterations, or no trial has started)"
    percent = 100 * fraction
    # Three significant digits below 100% (0.4%, 12.5%), whole percents above (5000%, not 5e+03).
    shown = f"{percent:.3g}" if percent < 100 else f"{percent:.0f}"
    return f"budget {shown}% of the space file's iterations"


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines; a "|" inside a cell (a claim's sentence may hold one) becomes
    "/", which would otherwise split the cell and shift every column after it."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"

    return [line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]
