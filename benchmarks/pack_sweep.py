"""The cost table in one run: ms per training step of a pack of K h-detach trials, per shape,
K and precision, against a cuDNN nn.LSTM training step measured in the same run (issue 18).

Run from the repository root: `PYTHONPATH=. python benchmarks/pack_sweep.py --check-estimate`
(torch only: no Ray, MLflow or data sets; inputs are random, shaped as the paper's tasks, as in
benchmarks/lstm_step_cuda.py, whose study step this times). A point is the study's whole step of
one pack (host batch, copy, forward, loss, backward, clip, Adam: study.packed_train._Pack.step,
graph-replayed on a GPU), the median over --rounds of the mean of --steps steps after one
warm-up call; K runs over --members (`auto`: pack_layout.resident_pack on this device's SMs).
It writes the table (the cost-table contract, read by study/costs.py) to each --table (a file
ending in .json, else a folder given <gpu>.json; default on a GPU:
benchmarks/results/<gpu>.json), rewritten after every point, so a run cut short keeps what it
measured. Every entry's eval_ms_per_pack_batch is K x one member's evaluation of one batch
(study.trial.evaluate, trial.EVAL_BATCH_SIZE sequences, no_grad: cuDNN), measured once per
shape and precision: train_packed evaluates its members one after another. Then it prints
issue 18's targets: per shape, the best K's per-trial step and one tf32 trial against cuDNN,
and the paper's whole study (search_spaces/paper, `pack: auto` on this GPU) priced from the
table just written, as `study plan search_spaces/paper --estimate` prices it.

The measuring runs in a child process that the script starts (`--serve`) and feeds one point at
a time: a point that fails is printed as failed with its reason, and one that hangs (programs
that wait on each other) or kills its CUDA context is cut off after --point-timeout-s and the
sweep goes on in a fresh child. On a GPU, --warm-workers children first run one step of each
kernel configuration in parallel, so Triton compiles them at once into its disk cache rather
than one after another inside the timed sweep. Points are skipped (and printed as skipped)
once the run has used --budget-s, or when a point's predicted time (its smaller neighbour's
step x K ratio) would pass --point-cap-s. Exit status 1 if a point or the check failed to run;
missed targets and a FAIL of the estimate check are findings, printed, exit 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lstm_step_cuda import (
    P_DETACH,
    SHAPES,
    RandomTask,
    pack_step,
    path_note,
    release,
    time_steps,
)
from torch import nn

from study import cost_text, costs
from study.config import TrialConfig
from study.errors import ConfigError
from study.models import SequenceClassifier, triton_lstm
from study.models.cuda_graph import WARMUP_STEPS
from study.pack_layout import KNOWN_GPUS, GpuModel, choose_layout, resident_pack, widest_rows
from study.packed_train import cuda_precision, train_packed
from study.space import make_plan
from study.spec import load_spec, space_files
from study.tasks import TASKS
from study.trial import EVAL_BATCH_SIZE, evaluate

REPO = Path(__file__).resolve().parent.parent
# name -> (label, T, B, H, classes, readout): the two paper shapes of lstm_step_cuda (copying
# T=100: 120 LSTM steps, H=128; pixel MNIST: 784, H=100; batch 100), and a tiny one that a CPU
# runs in seconds (the script's own test).
SWEEP_SHAPES = {
    "copying": SHAPES[0],
    "pixel_mnist": SHAPES[1],
    "tiny": ("tiny (CPU check)", 5, 8, 16, 10, "last"),
}
MEMBERS = ("1", "2", "4", "8", "16", "32", "64", "auto")
# Issue 18's targets, each against the cuDNN step of its shape.
BEST_PACK_TARGET = 0.1  # per-trial step of the best K
SINGLE_TRIAL_TARGET = 1.0  # one trial, tf32
WHOLE_STUDY_TARGET_H = 1.0  # every paper space at full budget, GPU-hours by the new table
PAPER_SPACES = REPO / "search_spaces" / "paper"
CHECK_TOLERANCE = 0.15  # the estimate against a measured train_packed run
ROWS_SWITCH = "HDETACH_TRITON_SPLIT_ROWS"  # a forced split layout (triton_split), if set
MESSAGE = "@@"  # a child's answer line starts with this, followed by one JSON object
RANDOM_TASK = "random"  # lstm_step_cuda.RandomTask, registered while the check runs


# --- the child: measures one point per request -------------------------------------------------


def _shape(request: dict[str, Any]) -> tuple[int, int, int, int, str]:
    _, seq_len, batch, hidden, classes, readout = SWEEP_SHAPES[request["shape"]]
    return seq_len, batch, hidden, classes, readout


def _kernels() -> str:
    names = sorted(triton_lstm.used) or ["per-step"]
    return ", ".join(name if name == "per-step" else f"Triton {name}" for name in names)


def measure_pack(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One pack's study step (timed as lstm_step_cuda.study_step times it), the kernels it ran,
    and its start-up: building the members and the first call (kernels loaded, on a GPU the
    CUDA graph's warm-up steps and capture) less the one step that call makes."""
    triton_lstm._failed.clear()
    triton_lstm.used.clear()
    with cuda_precision(request["precision"], device):
        _synchronize(device)
        started = time.perf_counter()
        step = pack_step(_shape(request), request["members"], device, request["precision"])
        step()
        _synchronize(device)
        first_ms = (time.perf_counter() - started) * 1000
        ms = time_steps(step, request["steps"], request["rounds"])
    release()
    start_ms = first_ms - ms if first_ms > ms else None  # not measurable under the noise
    note = path_note("Triton").strip(" []")
    return {"ms": ms, "start_ms": start_ms, "kernel": _kernels(), "note": note}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_pack(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One step of a pack, untimed: its first call compiles the kernels (Triton's disk cache)."""
    triton_lstm.used.clear()
    with cuda_precision(request["precision"], device):
        pack_step(_shape(request), request["members"], device, request["precision"])()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    release()
    return {"kernel": _kernels()}


def measure_cudnn(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """cuDNN nn.LSTM's whole training step (forward, loss, backward, clip, Adam) with torch's
    defaults (cuDNN in TF32, matmuls in fp32): lstm_step_cuda's "STEP nn.LSTM + clip + Adam,
    eager" row, its inputs already on the device."""
    seq_len, batch, hidden, classes, readout = _shape(request)
    x = torch.rand(seq_len, batch, 1, device=device)
    y_shape = (seq_len, batch) if readout == "all" else (batch,)
    y = torch.randint(0, classes, y_shape, device=device)
    lstm, head = nn.LSTM(1, hidden).to(device), nn.Linear(hidden, classes).to(device)
    parameters = [*lstm.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        output, (h_n, _) = lstm(x)
        logits = head(h_n[-1] if readout == "last" else output)
        flat = logits.reshape(-1, classes)
        nn.functional.cross_entropy(flat, y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    try:
        ms = time_steps(train_step, request["steps"], request["rounds"])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    release()
    return {"ms": ms}


def measure_eval(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One member's evaluation of one batch, as train_packed runs it per member (trial.evaluate:
    no_grad, torch's fused LSTM; the batch made on the host and copied in; the loss read back)."""
    seq_len, _, hidden, classes, readout = _shape(request)
    task = RandomTask(seq_len, classes, readout)
    model = SequenceClassifier(1, hidden, classes).to(device)
    with cuda_precision(request["precision"], device):
        ms = time_steps(
            lambda: evaluate(model, task, "val", device), request["steps"], request["rounds"]
        )
    release()
    return {"ms": ms, "batch": EVAL_BATCH_SIZE}


def check_run(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Wall seconds of train_packed for a pack of real TrialConfigs on the random task, for
    `iterations` and for twice as many, evaluating every `iterations` (so once, and twice):
    end to end, from building the members to the last evaluation's read-back."""
    seq_len, batch, hidden, classes, readout = _shape(request)
    options = {"seq_len": seq_len, "num_classes": classes, "readout": readout}
    iterations = request["iterations"]
    TASKS[RANDOM_TASK] = RandomTask  # for TrialConfig (check_registered) and train_packed
    seconds, statuses = [], []
    try:
        for total in (iterations, 2 * iterations):
            configs = [
                TrialConfig(
                    task=RANDOM_TASK,
                    task_options=options,
                    method="h_detach",
                    p_detach=P_DETACH,
                    lr=(1e-3, 5e-4)[k % 2],
                    hidden_size=hidden,
                    batch_size=batch,
                    seed=k,
                    iterations=total,
                    eval_every=iterations,
                    device=str(device),
                    precision=request["precision"],
                )
                for k in range(request["members"])
            ]
            triton_lstm.used.clear()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            results = train_packed(configs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
            statuses.append(sorted({result.status for result in results}))
            release()
    finally:
        TASKS.pop(RANDOM_TASK, None)
    return {"seconds": seconds, "statuses": statuses, "kernel": _kernels()}


HANDLERS: dict[str, Callable[[dict[str, Any], torch.device], dict[str, Any]]] = {
    "pack": measure_pack,
    "warm": warm_pack,
    "cudnn": measure_cudnn,
    "eval": measure_eval,
    "check": check_run,
}


def _answer(message: dict[str, Any]) -> None:
    print(MESSAGE + json.dumps(message), flush=True)


def _healthy(device: torch.device) -> bool:
    """Whether the CUDA context still works after a failure (an illegal access poisons it)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:  # whatever broke, this process cannot measure any more
        return False


def serve(device_name: str) -> None:
    """The child: say what device this is, then answer one JSON request per input line."""
    if device_name == "cuda" and not torch.cuda.is_available():
        _answer({"error": "no CUDA device here"})
        return
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    _answer(
        {
            "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
            "sms": torch.cuda.get_device_properties(device).multi_processor_count if cuda else 0,
            "torch": torch.__version__,
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        try:
            answer = HANDLERS[request["kind"]](request, device)
        except Exception as error:  # a failed point is reported; the sweep goes on
            release()
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            answer = {"error": f"{type(error).__name__}: {reason}"[:300]}
            if not _healthy(device):
                answer["error"] += " (the CUDA context is lost: a fresh child takes over)"
                answer["wall_s"] = time.perf_counter() - started
                _answer(answer)
                sys.exit(3)
        answer["wall_s"] = time.perf_counter() - started
        _answer(answer)


# --- the parent: orders, times out, skips and reports -----------------------------------------


class ChildLost(Exception):
    """The child died or stopped answering; the next request starts a fresh one."""


LIVE: set[Child] = set()  # the children still running, for stop_children


class Child:
    """A `--serve` process and the answers it prints (other lines pass through, labelled)."""

    def __init__(self, device: str, label: str = "") -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--device", device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: a hung child is killed whole
        )
        LIVE.add(self)
        self.label = label
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(MESSAGE):
                self.answers.put(json.loads(line[len(MESSAGE) :]))
            else:
                print(f"{self.label}{line}", end="", flush=True)
        self.answers.put(None)

    def receive(self, timeout: float) -> dict[str, Any]:
        try:
            answer = self.answers.get(timeout=max(timeout, 1.0))
        except queue.Empty:
            self.kill()
            raise ChildLost(f"no answer within {timeout:.0f} s (killed)") from None
        if answer is None:
            code = self.process.wait()
            raise ChildLost(f"the measuring process exited with code {code}")
        return answer

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except OSError:
            code = self.process.wait()
            raise ChildLost(f"the measuring process exited with code {code}") from None
        return self.receive(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        LIVE.discard(self)

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        LIVE.discard(self)


def stop_children(signum: int, frame: object) -> None:
    """On SIGTERM (a stage's `timeout`) or Ctrl-C: kill the children, whose own process groups
    the signal does not reach (one spinning in a kernel would hold the GPU for the next stage)."""
    for child in list(LIVE):
        child.kill()
    sys.exit(128 + signum)


@dataclass(frozen=True)
class Point:
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


def parse_members(values: list[str]) -> list[str]:
    for value in values:
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            raise ConfigError(f"--members: {value!r} is neither a pack size >= 1 nor auto")
    return values


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


def _commit() -> str:
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


class Runner:
    """Sends requests to one child at a time; a lost child is replaced on the next request."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.child: Child | None = None
        self.hello: dict[str, Any] = {}

    def start(self, timeout: float) -> dict[str, Any]:
        self.child = Child(self.device)
        self.hello = self.child.receive(timeout)
        return self.hello

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The child's answer, or {"error": why} when the child was lost (then replaced)."""
        try:
            if self.child is None or self.child.process.poll() is not None:
                self.start(timeout=120)
            assert self.child is not None
            return self.child.ask(request, timeout)
        except ChildLost as lost:
            self.child = None
            return {"error": str(lost)}

    def close(self) -> None:
        if self.child is not None:
            self.child.close()


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
            run_packs(sweep, runner, shape, precision)
            write_tables(sweep, paths, commit)


def run_packs(sweep: Sweep, runner: Runner, shape: str, precision: str) -> None:
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
        previous = (members, answer["ms"])
        print(
            f"{label}: {answer['ms']:.2f} ms per pack step [{answer['kernel']}] "
            f"({answer['wall_s']:.1f} s)",
            flush=True,
        )


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


def check_estimate(sweep: Sweep, runner: Runner, paths: list[Path]) -> bool:
    """train_packed for --check-iterations of one full pack, end to end, against the table's
    estimate: the pack's start-up + iterations x step + one evaluation (eval_every =
    iterations) x the pack's evaluation batch (the random task's validation split is one
    batch), as study.costs prices a study's pack. PASS within 15%. A second run of twice the
    iterations separates the per-step cost from the fixed one."""
    args = sweep.args
    point = check_point(sweep)
    if point is None:
        print("estimate check: no pack was measured, nothing to check")
        return False
    iterations = args.check_iterations
    request = base_request(args, "check", point) | {"iterations": iterations}
    timeout = max(20.0, args.budget_s - sweep.elapsed())
    answer = runner.ask(request, timeout)
    what = (
        f"{point.shape}, pack of {point.members}{' (K auto)' if point.auto else ''}, "
        f"{point.precision}, train_packed for {iterations} iterations + 1 evaluation"
    )
    if "error" in answer:
        print(f"estimate check ({what}): FAILED to run: {answer['error']}")
        return False
    step, pack_eval, start, source = table_costs(sweep, point, paths)
    measured, doubled = answer["seconds"]
    counted = "counted" if pack_eval is not None else "not counted: no eval cost measured"
    estimated = ((start or 0.0) + iterations * step + (pack_eval or 0.0)) / 1000
    ratio = measured / estimated
    verdict = "PASS" if abs(ratio - 1) <= CHECK_TOLERANCE else "FAIL"
    start_text = f"{start:.1f} ms (start-up) + " if start is not None else ""
    eval_text = f" + 1 x {pack_eval:.1f} ms (eval)" if pack_eval is not None else ""
    print(
        f"\nestimate check ({what}, evaluation {counted}; kernels {answer['kernel']}; "
        f"statuses {answer['statuses'][0]}): measured {measured:.3f} s end to end, estimated "
        f"{estimated:.3f} s = {start_text}{iterations} x {step:.2f} ms (step){eval_text} from "
        f"{source}; ratio {ratio:.3f}: {verdict} (within {CHECK_TOLERANCE:.0%})"
    )
    per_step = (doubled - measured - (pack_eval or 0.0) / 1000) / iterations * 1000
    fixed = measured - iterations * per_step / 1000 - (pack_eval or 0.0) / 1000
    table_start = f"table {start / 1000:.3f}" if start is not None else "not in the table"
    print(
        f"estimate check, {2 * iterations} iterations + 2 evaluations: {doubled:.3f} s, so "
        f"{per_step:.2f} ms per step beyond the first {iterations} (table {step:.2f}) and "
        f"{fixed:.3f} s per run outside steps and evaluation ({table_start}: members built, "
        "graph captured)"
    )
    return True


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
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:  # the child takes everything else from its requests
        return args
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
    if args.serve:
        serve(args.device)
        return
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
    commit = _commit()
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
            checked = check_estimate(sweep, runner, paths)
    finally:
        runner.close()
    print(f"\n({sweep.elapsed():.0f} s; table: {', '.join(map(str, paths)) or 'none'})")
    if sweep.failures or not checked:
        sys.exit(1)


if __name__ == "__main__":
    main()
