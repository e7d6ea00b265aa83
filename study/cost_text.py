"""What `study plan --estimate` prints: one study's estimate and, for several spaces (a folder
such as search_spaces/paper), their total with a line per study. Text only: study/costs.py
prices every pack, from the cost table, and every number here is one of its."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.costs import (
    CostTable,
    Estimate,
    PackEstimate,
    Studies,
    Unestimated,
    estimate,
    table_precision,
)

if TYPE_CHECKING:
    from study.space import Plan


def format_duration(seconds: float) -> str:
    """GPU time as people plan it: minutes under an hour, else hours to one decimal."""
    if seconds < 3600:
        return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def estimate_text(plan: Plan, gpu: str, folder: Path | None = None) -> str:
    """The lines `study plan --estimate --gpu NAME` prints."""
    return describe(estimate(plan, gpu, folder))


def _table_line(table: CostTable) -> str:
    return (
        f"GPU {table.gpu}: {table.device_name}, cost table {table.path.name} measured "
        f"{table.measured_on} at {table.commit} (torch {table.torch})"
    )


def _how_summed(table: CostTable) -> list[str]:
    return [
        f"  GPU time = the packs one after another on one {table.gpu} (N GPUs: about 1/N the "
        "wall time); not counted: each pack's process start and data loading",
        f"  table source: {table.source}",
    ]


def _counted(eval_included: bool, start_included: bool) -> str:
    """What an estimate's time holds besides the training steps."""
    extra = [
        name
        for name, on in (("evaluation", eval_included), ("pack start-up", start_included))
        if on
    ]
    if not extra:
        return "training steps only"
    return "training and " + extra[0] if len(extra) == 1 else "training, " + " and ".join(extra)


def describe(result: Estimate, alone: bool = True) -> str:
    """One study's estimate as printed; `alone=False` leaves out the table's lines (the GPU,
    where the table came from, how times add up), which a set of studies prints once."""
    table = result.table
    lines = [_table_line(table)] if alone else []
    trials = result.estimated_trials
    what = _counted(result.eval_included, result.start_included)
    if not result.packs:
        lines.append(f"estimate: none of the {result.n_trials} trials could be estimated")
    else:
        lines.append(
            f"estimate: {format_duration(result.total_s)} of GPU time ({what}) for {trials} of "
            f"{result.n_trials} trials in {len(result.packs)} of {_plural(result.n_packs, 'pack')}"
        )
    groups: dict[tuple[Any, ...], list[PackEstimate]] = {}
    for pack in result.packs:
        key = (pack.task, pack.steps, pack.hidden, pack.batch, pack.members, pack.precision)
        groups.setdefault(key, []).append(pack)
    for (task, steps, hidden, batch, members, precision), packs in groups.items():
        cost = packs[0].cost
        shown = f"auto (as {table_precision(precision)})" if precision == "auto" else precision
        per_trial = cost.ms_per_pack_step / members
        ratio = f", {per_trial / cost.cudnn_step_ms:.2f}x cuDNN" if cost.cudnn_step_ms else ""
        how = []
        if cost.between_members:
            how.append("interpolated between packs of {} and {}".format(*cost.between_members))
        if cost.scaled_from_steps:
            how.append(f"scaled from {cost.scaled_from_steps} steps")
        note = f" [{'; '.join(how)}]" if how else ""
        seconds = sum(p.total_s for p in packs)
        iterations = sorted({p.iterations for p in packs})
        its = "/".join(f"{n:,}" for n in iterations)
        counted = _plural(len(packs), "pack")
        lines.append(
            f"  {task} {steps} steps H={hidden} B={batch} {shown}: {counted} of {members} x"
            f" {its} its x {cost.ms_per_pack_step:.2f} ms "
            f"({per_trial:.2f} ms per trial-step{ratio}) = {format_duration(seconds)}{note}"
        )
    without_eval = [p for p in result.packs if p.eval_s is None]
    if len(without_eval) == len(result.packs) and result.packs:
        lines.append("  evaluation not included: the table has no eval_ms_per_pack_batch")
    elif without_eval:
        lines.append(
            f"  evaluation not included for {_plural(len(without_eval), 'pack')}: no "
            "eval_ms_per_pack_batch at their shape, or no val_size option in their task"
        )
    without_start = [p for p in result.packs if p.start_s is None]
    if without_start:
        count = len(without_start)
        some = "" if count == len(result.packs) else f" for {_plural(count, 'pack')}"
        lines.append(f"  pack start-up not included{some}: the table has no start_ms there")
    elif result.packs:
        start = sum(p.start_s or 0.0 for p in result.packs)
        lines.append(
            f"  pack start-up included: {format_duration(start)} in all (members built, kernels "
            "loaded, CUDA graph captured)"
        )
    for reason, items in _by_reason(result.unestimated).items():
        names = ", ".join(u.what for u in items[:5]) + (", ..." if len(items) > 5 else "")
        count = sum(u.trials for u in items)
        lines.append(f"  not estimated: {count} trials ({names}): {reason}")
    if alone:
        lines.extend(_how_summed(table))
    return "\n".join(lines)


def studies_headline(studies: Studies) -> str:
    """The total of several studies, in one clause: time, what it counts, trials and packs."""
    what = _counted(studies.eval_included, studies.start_included)
    bound = "" if studies.complete else " (a lower bound: not every trial could be estimated)"
    return (
        f"{format_duration(studies.total_s)} of GPU time ({what}) for "
        f"{studies.estimated_trials} of {studies.n_trials} trials in {studies.estimated_packs} "
        f"of {_plural(studies.n_packs, 'pack')}{bound}"
    )


def studies_text(studies: Studies) -> str:
    """The closing lines of `study plan SPACE SPACE... --estimate`: the total, a line per
    study, and the table's lines once."""
    table = studies.estimates[0].table
    lines = [
        _table_line(table),
        f"all {len(studies.estimates)} studies: {studies_headline(studies)}",
    ]
    width = max(len(e.study) for e in studies.estimates)
    for result in studies.estimates:
        trials = result.estimated_trials
        missing = result.n_trials - trials
        note = f"; not estimated: {missing}" if missing else ""
        lines.append(
            f"  {result.study:<{width}}  {format_duration(result.total_s):>7}  {trials} of "
            f"{result.n_trials} trials in {len(result.packs)} of "
            f"{_plural(result.n_packs, 'pack')}{note}"
        )
    lines.extend(_how_summed(table))
    return "\n".join(lines)


def _by_reason(items: tuple[Unestimated, ...]) -> dict[str, list[Unestimated]]:
    grouped: dict[str, list[Unestimated]] = {}
    for item in items:
        grouped.setdefault(item.reason, []).append(item)
    return grouped
