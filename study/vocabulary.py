"""The words every layer shares, each defined once: trial statuses, how "off" is spelled for a
clip norm, and how a value is printed."""

from __future__ import annotations

from typing import Any

# A trial's status as train() reports it and as MLflow's tags and the report read it back.
# `diverged` is an outcome, not a failure: a non-finite loss is a result of the setting (paper
# Fig. 4/8: vanilla LSTM without clipping), so it counts in the statistics.
COMPLETED, DIVERGED, FAILED, RUNNING = "completed", "diverged", "failed", "running"
OUTCOMES = (COMPLETED, DIVERGED, FAILED)

# How users write "no clipping" in flags and YAML; the canonical spelling is null / None.
CLIP_OFF_WORDS = ("none", "null", "off")


def parse_clip(text: Any) -> float | None:
    """A clip norm from text or YAML: a number, or None for "none"/"null"/"off" (no clipping).
    Raises ValueError (or TypeError) on anything else; callers name the field in their error."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise ValueError(f"expected a number or none, got {text!r}")
    if isinstance(text, str) and text.strip().lower() in CLIP_OFF_WORDS:
        return None
    return float(text)


def format_value(value: Any) -> str:
    """A setting as `plan`, the console and the report print it: none, true, 0.001, [1, 2]."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)
