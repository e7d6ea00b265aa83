"""What benchmarks/pack_sweep.py prints of a run: the measured table, issue 18's three targets
and the estimate check's verdict. Reads a Sweep (sweep_table), runs nothing.

The targets, each against the cuDNN step of its shape measured in the same run: the best K's
per-trial step at most 0.1x; one tf32 trial at most 1.0x; the paper's whole study
(search_spaces/paper at full budget, `pack: auto` on this GPU), priced from the table the run
has just written as `study plan search_spaces/paper --estimate` prices it, at most one GPU-hour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweep_measure import SWEEP_SHAPES
from sweep_table import Point, Sweep, predicted_layout, sizes

from study import cost_text, costs
from study.errors import ConfigError
from study.pack_layout import GpuModel
from study.space import make_plan
from study.spec import load_spec, space_files
from study.trial import EVAL_BATCH_SIZE

REPO = Path(__file__).resolve().parent.parent
BEST_PACK_TARGET = 0.1  # per-trial step of the best K
SINGLE_TRIAL_TARGET = 1.0  # one trial, tf32
WHOLE_STUDY_TARGET_H = 1.0  # every paper space at full budget, GPU-hours by the new table
PAPER_SPACES = REPO / "search_spaces" / "paper"
CHECK_TOLERANCE = 0.15  # the estimate against a measured train_packed run


def device_text(sweep: Sweep) -> str:
    return f"{sweep.device_name} ({sweep.sms} SMs)" if sweep.cuda else sweep.device_name


def print_table(sweep: Sweep) -> None:
    print(f"\ndevice: {device_text(sweep)} | torch {sweep.torch_version}")
    for shape in sweep.args.shapes:
        label, seq_len, batch, hidden, _, _ = SWEEP_SHAPES[shape]
        cudnn = sweep.cudnn.get(shape)
        baseline = f"{cudnn:.2f} ms" if cudnn else "not measured"
        print(
            f"\n{label}: T={seq_len}, B={batch}, H={hidden}; median ms per training step; "
            f"cuDNN step (nn.LSTM + clip + Adam; on a GPU cuDNN, TF32 default): {baseline}"
        )
        print(
            f"{'precision':<10}{'K':>8}  {'layout':<16}{'kernel':<22}{'ms/pack step':>13}"
            f"{'ms/trial':>10}{'/ cuDNN':>9}{'eval ms':>10}  note"
        )
        for precision in sweep.args.precisions:
            for members, auto in sizes(sweep, shape, precision):
                point = Point(shape, precision, members, auto)
                k = f"{members} auto" if auto else str(members)
                layout = predicted_layout(sweep, shape, members, precision)
                result = sweep.packs.get(point)
                if result is None:
                    note = sweep.notes.get(point, "not measured")
                    print(f"{precision:<10}{k:>8}  {layout:<16}{'-':<22}{'':>42}  {note}")
                    continue
                ms = result["ms"]
                ratio = f"{ms / members / cudnn:>9.3f}" if cudnn else f"{'-':>9}"
                member_eval = sweep.eval_member.get((shape, precision))
                evals = f"{member_eval * members:>10.1f}" if member_eval else f"{'-':>10}"
                print(
                    f"{precision:<10}{k:>8}  {layout:<16}{result['kernel']:<22}{ms:>13.2f}"
                    f"{ms / members:>10.3f}{ratio}{evals}  {result['note']}"
                )
    print(
        "\nms/pack step: the study's whole step of one pack (host batch, copy, forward, loss, "
        "backward, clip, Adam); ms/trial = that / K; / cuDNN: per trial against the cuDNN step."
        "\nlayout: pack_layout.choose_layout's split layout (rows x units per program, SMs its "
        "programs take); none fits: the row kernels (tf32) or the per-step path (fp32)."
        f"\neval ms: one evaluation batch ({EVAL_BATCH_SIZE} sequences) of every member, K x one "
        "member's (trial.evaluate, measured once per shape and precision)."
    )


def verdicts(sweep: Sweep) -> list[str]:
    """Issue 18's targets, per shape: the best K's per-trial step <= 0.1 x cuDNN's step, and
    one trial's tf32 step <= 1.0 x."""
    lines = []
    for shape in sweep.args.shapes:
        cudnn = sweep.cudnn.get(shape)
        measured = [(p, r) for p, r in sweep.packs.items() if p.shape == shape]
        target = f"best per-trial step <= {BEST_PACK_TARGET} x cuDNN step at {shape}"
        if not cudnn or not measured:
            lines.append(f"issue 18 target: {target}: not measured")
        else:
            point, result = min(measured, key=lambda pr: pr[1]["ms"] / pr[0].members)
            ratio = result["ms"] / point.members / cudnn
            verdict = "met" if ratio <= BEST_PACK_TARGET else "MISSED"
            lines.append(
                f"issue 18 target: {target}: {ratio:.3f} {verdict} (K={point.members}, "
                f"{point.precision}, {result['kernel']})"
            )
        target = f"single trial tf32 <= {SINGLE_TRIAL_TARGET} x cuDNN step at {shape}"
        solo = sweep.packs.get(Point(shape, "tf32", 1))
        if not cudnn or solo is None:
            lines.append(f"issue 18 target: {target}: not measured")
        else:
            ratio = solo["ms"] / cudnn
            verdict = "met" if ratio <= SINGLE_TRIAL_TARGET else "MISSED"
            lines.append(f"issue 18 target: {target}: {ratio:.3f} {verdict} ({solo['kernel']})")
    return lines


def whole_study(sweep: Sweep, paths: list[Path]) -> list[str]:
    """Issue 18's third target: the paper's whole study (search_spaces/paper at full budget,
    `pack: auto` sized for this GPU) priced by study.costs from the table this run wrote, as
    `study plan search_spaces/paper --gpu GPU --estimate` prints it. Met only if every trial
    could be priced; else the total is a lower bound and the verdict says so."""
    target = f"whole paper study <= {WHOLE_STUDY_TARGET_H:g} GPU-hour on {sweep.gpu}"
    folders = [path.parent for path in paths if path.stem == sweep.gpu]
    if not folders:
        return [f"issue 18 target: {target}: not measured (no --table written for {sweep.gpu})"]
    gpu = GpuModel(sweep.gpu, sweep.device_name, sweep.sms) if sweep.cuda else None
    try:
        plans = [make_plan(load_spec(f), gpu) for f in space_files([PAPER_SPACES])]
        studies = costs.Studies(tuple(costs.estimate(p, sweep.gpu, folders[0]) for p in plans))
    except ConfigError as error:
        return [f"issue 18 target: {target}: not measured ({error})"]
    hours = studies.total_s / 3600
    if not studies.complete:
        reasons = sorted({u.reason for e in studies.estimates for u in e.unestimated})
        others = len(reasons) - 1
        more = f" (+{others} more reason{'s' if others > 1 else ''})" if others else ""
        verdict = (
            f"not measured: {studies.estimated_trials} of {studies.n_trials} trials priced; "
            f"{reasons[0]}{more}"
        )
        if not studies.estimated_trials:  # nothing to list study by study
            return [f"issue 18 target: {target}: {verdict}"]
    else:
        met = "met" if hours <= WHOLE_STUDY_TARGET_H else "MISSED"
        verdict = f"{hours:.2f} h {met} ({cost_text.studies_headline(studies)})"
    return [f"issue 18 target: {target}: {verdict}", cost_text.studies_text(studies)]


def check_point(sweep: Sweep) -> Point | None:
    """The pack the estimate check runs: pixel MNIST, tf32, K auto where measured; else the
    largest measured pack of the first shape and precision measured."""
    if not sweep.packs:
        return None
    for point in sweep.packs:
        if (point.shape, point.precision, point.auto) == ("pixel_mnist", "tf32", True):
            return point
    first = next(iter(sweep.packs))
    same = [p for p in sweep.packs if (p.shape, p.precision) == (first.shape, first.precision)]
    return max(same, key=lambda p: p.members)


def table_costs(
    sweep: Sweep, point: Point, paths: list[Path]
) -> tuple[float, float | None, float | None, str]:
    """(ms per pack step, ms per evaluation batch of the pack, ms of pack start-up, where from):
    study.costs reading the table just written, else the entry measured in this run."""
    _, seq_len, batch, hidden, _, _ = SWEEP_SHAPES[point.shape]
    for path in paths:
        if path.stem != sweep.gpu:
            continue
        try:
            table = costs.load_table(sweep.gpu, path.parent)
            cost = costs.step_cost(
                table,
                steps=seq_len,
                hidden=hidden,
                batch=batch,
                members=point.members,
                precision=point.precision,
            )
        except ConfigError as error:
            print(f"estimate check: study.costs could not use {path}: {error}")
            continue
        source = f"study.costs, {path.name}"
        return cost.ms_per_pack_step, cost.eval_ms_per_pack_batch, cost.start_ms, source
    member_eval = sweep.eval_member.get((point.shape, point.precision))
    pack_eval = None if member_eval is None else member_eval * point.members
    entry = sweep.packs[point]
    return entry["ms"], pack_eval, entry.get("start_ms"), "this run's entry"


def estimate_check_lines(
    sweep: Sweep, point: Point, answer: dict[str, Any], paths: list[Path]
) -> list[str]:
    """The estimate check's verdict: the measured train_packed run (sweep_measure.check_run, for
    --check-iterations of one full pack, end to end) against the table's estimate, the pack's
    start-up + iterations x step + one evaluation (eval_every = iterations) x the pack's
    evaluation batch (the random task's validation split is one batch), as study.costs prices a
    study's pack. PASS within 15%. The second run, of twice the iterations, separates the
    per-step cost from the fixed one."""
    iterations = sweep.args.check_iterations
    what = (
        f"{point.shape}, pack of {point.members}{' (K auto)' if point.auto else ''}, "
        f"{point.precision}, train_packed for {iterations} iterations + 1 evaluation"
    )
    if "error" in answer:
        return [f"estimate check ({what}): FAILED to run: {answer['error']}"]
    step, pack_eval, start, source = table_costs(sweep, point, paths)
    measured, doubled = answer["seconds"]
    counted = "counted" if pack_eval is not None else "not counted: no eval cost measured"
    estimated = ((start or 0.0) + iterations * step + (pack_eval or 0.0)) / 1000
    ratio = measured / estimated
    verdict = "PASS" if abs(ratio - 1) <= CHECK_TOLERANCE else "FAIL"
    start_text = f"{start:.1f} ms (start-up) + " if start is not None else ""
    eval_text = f" + 1 x {pack_eval:.1f} ms (eval)" if pack_eval is not None else ""
    per_step = (doubled - measured - (pack_eval or 0.0) / 1000) / iterations * 1000
    fixed = measured - iterations * per_step / 1000 - (pack_eval or 0.0) / 1000
    table_start = f"table {start / 1000:.3f}" if start is not None else "not in the table"
    return [
        f"estimate check ({what}, evaluation {counted}; kernels {answer['kernel']}; "
        f"statuses {answer['statuses'][0]}): measured {measured:.3f} s end to end, estimated "
        f"{estimated:.3f} s = {start_text}{iterations} x {step:.2f} ms (step){eval_text} from "
        f"{source}; ratio {ratio:.3f}: {verdict} (within {CHECK_TOLERANCE:.0%})",
        f"estimate check, {2 * iterations} iterations + 2 evaluations: {doubled:.3f} s, so "
        f"{per_step:.2f} ms per step beyond the first {iterations} (table {step:.2f}) and "
        f"{fixed:.3f} s per run outside steps and evaluation ({table_start}: members built, "
        "graph captured)",
    ]
