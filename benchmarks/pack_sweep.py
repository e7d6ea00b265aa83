"""The cost table in one run: ms per training step of a pack of K h-detach trials, per shape,
K and precision, against a cuDNN nn.LSTM training step measured in the same run (issue 18).

Run from the repository root: `PYTHONPATH=. python benchmarks/pack_sweep.py --check-estimate`
(torch only: no Ray, MLflow or data sets; inputs are random, shaped as the paper's tasks, as in
benchmarks/lstm_step_cuda.py, whose study step this times). A point is the study's whole step of
one pack (host batch, copy, forward, loss, backward, clip, Adam: study.packed_train._Pack.step,
graph-replayed on a GPU), the median over --rounds of the mean of --steps steps after one
warm-up call; K runs over --members (`auto`: pack_layout.resident_pack on this device's SMs).
Every entry's eval_ms_per_pack_batch is K x one member's evaluation of one batch
(study.trial.evaluate, trial.EVAL_BATCH_SIZE sequences, no_grad: cuDNN), measured once per
shape and precision: train_packed evaluates its members one after another.

The run, in the order this file does it, each part in its own file:
- the measuring happens in a child process (sweep_measure.py) that sweep_children.py starts,
  feeds one point at a time and cuts off: a point that fails is printed as failed with its
  reason, and one that hangs (programs that wait on each other) or kills its CUDA context is cut
  off after --point-timeout-s, and the sweep goes on in a fresh child. On a GPU,
  --warm-workers children first run one step of each kernel configuration in parallel, so that
  Triton compiles them at once into its disk cache, not one after another inside the timed
  sweep;
- points are skipped (and printed as skipped) once the run has used --budget-s, or when a
  point's predicted time (its smaller neighbour's step x K ratio) would pass --point-cap-s;
- the table (the cost-table contract, read by study/costs.py; sweep_table.py) goes to each
  --table (a file ending in .json, else a folder given <gpu>.json; default on a GPU:
  benchmarks/results/<gpu>.json), rewritten after every point, so a run cut short keeps what it
  measured;
- then it prints the table and issue 18's targets (sweep_verdicts.py): per shape, the best K's
  per-trial step and one tf32 trial against cuDNN, and the paper's whole study
  (search_spaces/paper, `pack: auto` on this GPU) priced from the table just written, as
  `study plan search_spaces/paper --estimate` prices it; with --check-estimate, the estimate
  against a measured train_packed run of one full pack.

Exit status 1 if a point or the check failed to run; missed targets and a FAIL of the estimate
check are findings, printed, exit 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweep_children import Child, ChildLost, Runner, stop_children
from sweep_measure import SWEEP_SHAPES
from sweep_table import (
    Point,
    Sweep,
    checkout_commit,
    predicted_layout,
    sizes,
    table_paths,
    write_tables,
)
from sweep_verdicts import (
    check_point,
    device_text,
    estimate_check_lines,
    print_table,
    verdicts,
    whole_study,
)

from study.errors import ConfigError
from study.models.cuda_graph import WARMUP_STEPS

MEMBERS = ("1", "2", "4", "8", "16", "32", "64", "auto")


def parse_members(values: list[str]) -> list[str]:
    for value in values:
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            raise ConfigError(f"--members: {value!r} is neither a pack size >= 1 nor auto")
    return values


def base_request(args: argparse.Namespace, kind: str, point: Point) -> dict[str, Any]:
    return {
        "kind": kind,
        "shape": point.shape,
        "precision": point.precision,
        "members": point.members,
        "rounds": args.rounds,
        "steps": args.steps,
    }


def warm_up(sweep: Sweep, points: list[Point]) -> None:
    """One step of each kernel configuration the sweep will run (one point per predicted
    layout and precision; per-step fp32 packs compile nothing), in parallel child processes,
    so Triton's compiles happen together. What fails here is measured (and reported) later."""
    args = sweep.args
    todo: dict[tuple[str, str, str], Point] = {}
    for point in points:
        layout = predicted_layout(sweep, point.shape, point.members, point.precision).split(" ")[0]
        if layout == "none" and point.precision == "fp32":
            continue
        todo.setdefault((point.shape, point.precision, layout), point)
    workers = min(args.warm_workers, len(todo))
    if not workers:
        return
    deadline = time.monotonic() + args.warm_timeout_s
    shares = [list(todo.values())[n::workers] for n in range(workers)]
    print(f"warming {len(todo)} kernel configurations in {workers} processes", flush=True)

    def work(n: int) -> list[str]:
        child = Child(args.device, label=f"[warm {n}] ")
        failed = []
        try:
            child.receive(deadline - time.monotonic())
            for point in shares[n]:
                answer = child.ask(base_request(args, "warm", point), deadline - time.monotonic())
                if "error" in answer:
                    failed.append(
                        f"{point.shape} {point.precision} K={point.members}: {answer['error']}"
                    )
        except ChildLost as lost:
            failed.append(f"warm-up process {n}: {lost}")
        finally:
            child.close()
        return failed

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        problems = [line for lines in pool.map(work, range(workers)) for line in lines]
    for line in problems:
        print(f"warm-up: {line}", flush=True)
    print(f"warm-up done in {time.monotonic() - started:.0f} s", flush=True)


def remaining(sweep: Sweep) -> float:
    reserve = sweep.args.check_reserve_s if sweep.args.check_estimate else 0.0
    return sweep.args.budget_s - reserve - sweep.elapsed()


def run_points(sweep: Sweep, runner: Runner, paths: list[Path], commit: str) -> None:
    """Every shape and precision in order: the cuDNN step once per shape, one member's
    evaluation, then the packs by ascending K."""
    args = sweep.args
    for precision in args.precisions:
        for shape in args.shapes:
            if shape not in sweep.cudnn and remaining(sweep) > 0:
                request = {"kind": "cudnn", "shape": shape, "rounds": max(args.rounds, 5)}
                request["steps"] = max(args.steps, 10)
                answer = runner.ask(request, min(args.point_timeout_s, remaining(sweep) + 10))
                if "error" in answer:
                    sweep.failures += 1
                    print(f"cuDNN step at {shape} FAILED: {answer['error']}", flush=True)
                else:
                    sweep.cudnn[shape] = answer["ms"]
            if remaining(sweep) > 0:
                request = base_request(args, "eval", Point(shape, precision, 1))
                answer = runner.ask(request, min(args.point_timeout_s, remaining(sweep) + 10))
                if "error" in answer:
                    print(f"evaluation at {shape} {precision} failed: {answer['error']}")
                else:
                    sweep.eval_member[(shape, precision)] = answer["ms"]
            run_packs(sweep, runner, shape, precision, lambda: write_tables(sweep, paths, commit))


def run_packs(
    sweep: Sweep, runner: Runner, shape: str, precision: str, save: Callable[[], None]
) -> None:
    """The packs of one shape and precision by ascending K, each measured point saved at once
    (`save`: the table rewritten), so that a stage cut off by its time limit keeps them."""
    args = sweep.args
    previous: tuple[int, float] | None = None  # (K, ms) of the last measured pack here
    capped = ""
    # measure_pack's first call (the graph's warm-up steps, its capture, one replay), then
    # time_steps' own warm-up call and the timed rounds.
    steps_per_point = WARMUP_STEPS + 2 + 1 + args.rounds * args.steps
    for members, auto in sizes(sweep, shape, precision):
        point = Point(shape, precision, members, auto)
        if capped:
            sweep.notes[point] = capped
            continue
        if remaining(sweep) <= 0:
            sweep.notes[point] = (
                f"skipped: the run's budget (--budget-s {args.budget_s:g}) is used"
            )
            continue
        if previous is not None:
            predicted = previous[1] * members / previous[0] * steps_per_point / 1000
            if predicted > args.point_cap_s:
                capped = (
                    f"skipped: predicted {predicted:.1f} s from K={previous[0]} > --point-cap-s "
                    f"{args.point_cap_s:g} (this K and larger)"
                )
                sweep.notes[point] = capped
                continue
        timeout = min(args.point_timeout_s, remaining(sweep) + args.check_reserve_s)
        answer = runner.ask(base_request(args, "pack", point), timeout)
        label = f"{shape} {precision} K={members}"
        if "error" in answer:
            sweep.failures += 1
            sweep.notes[point] = f"FAILED: {answer['error']}"
            print(f"{label}: FAILED: {answer['error']}", flush=True)
            continue
        sweep.packs[point] = answer
        save()
        previous = (members, answer["ms"])
        print(
            f"{label}: {answer['ms']:.2f} ms per pack step [{answer['kernel']}] "
            f"({answer['wall_s']:.1f} s)",
            flush=True,
        )


def run_check(sweep: Sweep, runner: Runner, paths: list[Path]) -> bool:
    """The estimate check: train_packed for --check-iterations of one full pack (and twice as
    many), end to end, against what the table just written prices it at. False if it could
    not run."""
    point = check_point(sweep)
    if point is None:
        print("estimate check: no pack was measured, nothing to check")
        return False
    request = base_request(sweep.args, "check", point)
    request["iterations"] = sweep.args.check_iterations
    answer = runner.ask(request, timeout=max(20.0, sweep.args.budget_s - sweep.elapsed()))
    print()
    for line in estimate_check_lines(sweep, point, answer, paths):
        print(line)
    return "error" not in answer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shapes", nargs="+", choices=list(SWEEP_SHAPES))
    parser.add_argument("--members", nargs="+", default=list(MEMBERS), help="K values, or auto")
    parser.add_argument("--precisions", nargs="+", choices=["tf32", "fp32"])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per point")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--table", action="append", help="a .json file or a folder; repeatable")
    parser.add_argument("--check-estimate", action="store_true", help="then a train_packed run")
    parser.add_argument("--check-iterations", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=170.0, help="the whole run's seconds")
    parser.add_argument("--check-reserve-s", type=float, default=25.0)
    parser.add_argument("--point-cap-s", type=float, default=15.0, help="predicted s per point")
    parser.add_argument("--point-timeout-s", type=float, default=60.0)
    parser.add_argument("--warm-workers", type=int, help="parallel compiles (GPU default 6)")
    parser.add_argument("--warm-timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    args.shapes = args.shapes or ["copying", "pixel_mnist"]
    args.precisions = args.precisions or ["tf32", "fp32"]
    if args.warm_workers is None:
        args.warm_workers = 6 if args.device == "cuda" else 0
    try:
        parse_members(args.members)
    except ConfigError as error:
        parser.error(str(error))
    if args.device == "cpu" and "auto" in args.members:
        parser.error("--members auto: needs a GPU (its SM count); give pack sizes on a CPU")
    for name in ("rounds", "steps", "check_iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    runner = Runner(args.device)
    started = time.monotonic()
    try:
        hello = runner.start(timeout=120)
    except ChildLost as lost:
        raise SystemExit(f"pack_sweep: the measuring process did not start: {lost}") from None
    if "error" in hello:
        raise SystemExit(f"pack_sweep: {hello['error']} (--device cpu runs the script's check)")
    sweep = Sweep(args, hello["device_name"], hello["sms"], hello["torch"], started=started)
    paths = table_paths(args.table, sweep.gpu, sweep.cuda)
    commit = checkout_commit()
    print(f"device: {device_text(sweep)} | torch {sweep.torch_version}")
    print(f"table: {', '.join(map(str, paths)) or 'not written (no --table)'}", flush=True)
    points = [
        Point(shape, precision, members, auto)
        for precision in args.precisions
        for shape in args.shapes
        for members, auto in sizes(sweep, shape, precision)
    ]
    checked = True
    try:
        if sweep.cuda:
            warm_up(sweep, points)
        run_points(sweep, runner, paths, commit)
        print_table(sweep)
        print()
        for line in verdicts(sweep) + whole_study(sweep, paths):
            print(line)
        if args.check_estimate:
            checked = run_check(sweep, runner, paths)
    finally:
        runner.close()
    print(f"\n({sweep.elapsed():.0f} s; table: {', '.join(map(str, paths)) or 'none'})")
    if sweep.failures or not checked:
        sys.exit(1)


if __name__ == "__main__":
    main()
