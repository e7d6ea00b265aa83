"""What a planned study costs on a named GPU, from a measured cost table
(benchmarks/results/<gpu>.json, written by benchmarks/pack_sweep.py): `study plan --estimate`
(whose lines study/cost_text.py writes).

No torch at import: `study plan` stays fast. The table holds the median ms of one whole training
step of one pack (host batch, copy, forward, loss, backward, clip, Adam) per shape, pack size
(members) and precision; a pack's GPU time is its iterations x that step. Nothing here measures:
every number printed comes from the table, by the rules of step_cost().
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.config import resolve_precision
from study.errors import ConfigError

if TYPE_CHECKING:
    from study.space import Pack, Plan

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PRECISIONS = ("fp32", "tf32")  # what a GPU computes in; the table is a GPU's
TABLE_FIELDS = ("gpu", "device_name", "sms", "measured_on", "torch", "commit", "command", "source")
ENTRY_INTS = ("steps", "hidden", "batch", "members")
# Optional per entry (absent or null): not every run measures evaluation, start-up or cuDNN.
ENTRY_OPTIONAL = ("ms_per_trial_step", "cudnn_step_ms", "eval_ms_per_pack_batch", "start_ms")


@dataclass(frozen=True)
class CostEntry:
    """One measured row: a pack of `members` trials of one shape at one precision."""

    shape: str  # a label (copying, pixel_mnist); lookups go by steps, hidden and batch
    steps: int  # the LSTM's sequence length (copying T=100: 120; pixel MNIST: 784)
    hidden: int
    batch: int
    members: int
    precision: str  # fp32 | tf32
    kernel: str  # the kernels the run chose, as it printed them
    ms_per_pack_step: float
    ms_per_trial_step: float | None
    cudnn_step_ms: float | None  # nn.LSTM + clip + Adam, eager, at this shape
    # One evaluation batch (study.trial.EVAL_BATCH_SIZE sequences) for every member of the pack.
    eval_ms_per_pack_batch: float | None
    # Once per pack, before its first step: members built, kernels loaded, the CUDA graph's
    # warm-up steps and capture (the first call less one step). Small beside a study's 10^5
    # steps, not beside the 100 of the sweep's estimate check.
    start_ms: float | None


@dataclass(frozen=True)
class CostTable:
    path: Path
    gpu: str
    device_name: str
    sms: int
    measured_on: str
    torch: str
    commit: str
    command: str
    source: str
    entries: tuple[CostEntry, ...]


@dataclass(frozen=True)
class StepCost:
    """A pack's step read from the table, and how: measured, interpolated or scaled."""

    ms_per_pack_step: float
    eval_ms_per_pack_batch: float | None
    cudnn_step_ms: float | None
    start_ms: float | None  # once per pack (CostEntry.start_ms)
    between_members: tuple[int, int] | None  # interpolated between these measured pack sizes
    scaled_from_steps: int | None  # scaled linearly in T from this measured sequence length


def table_path(gpu: str, folder: Path | None = None) -> Path:
    return (RESULTS if folder is None else Path(folder)) / f"{gpu.lower()}.json"


def load_table(gpu: str, folder: Path | None = None) -> CostTable:
    """The cost table of `gpu` (h100, h200, ...); a one-line ConfigError names the file when it
    is missing (with the tables there are) or damaged."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", gpu):
        raise ConfigError(f"--gpu {gpu!r}: a GPU name such as h100 or h200 (letters, digits)")
    path = table_path(gpu, folder)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        there = sorted(p.stem for p in path.parent.glob("*.json"))
        listed = ", ".join(there) if there else "none"
        raise ConfigError(
            f"{path}: no cost table for GPU {gpu.lower()} (tables there: {listed}); "
            "benchmarks/pack_sweep.py writes one on that GPU"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    return _parse_table(path, raw, gpu.lower())


def _parse_table(path: Path, raw: Any, gpu: str) -> CostTable:
    def damaged(what: str) -> ConfigError:
        return ConfigError(f"{path}: damaged cost table: {what}")

    if not isinstance(raw, dict):
        raise damaged("expected a JSON object")
    missing = [name for name in (*TABLE_FIELDS, "entries") if name not in raw]
    if missing:
        raise damaged(f"missing field(s) {', '.join(missing)}")
    if raw["gpu"] != gpu:
        raise damaged(f"gpu is {raw['gpu']!r}, the file name says {gpu!r}")
    entries = raw["entries"]
    if not isinstance(entries, list) or not entries:
        raise damaged("entries must be a non-empty list")
    parsed = tuple(_parse_entry(entry, n, damaged) for n, entry in enumerate(entries))
    seen: set[tuple[Any, ...]] = set()
    for entry in parsed:
        key = (entry.steps, entry.hidden, entry.batch, entry.members, entry.precision)
        if key in seen:
            raise damaged(f"two entries for steps, hidden, batch, members, precision {key}")
        seen.add(key)
    values = {name: raw[name] for name in TABLE_FIELDS}
    if type(values["sms"]) is not int:
        raise damaged(f"sms must be an integer, got {values['sms']!r}")
    for name in TABLE_FIELDS:
        if name != "sms" and not isinstance(values[name], str):
            raise damaged(f"{name} must be text, got {values[name]!r}")
    return CostTable(path=path, entries=parsed, **values)


def _parse_entry(raw: Any, n: int, damaged: Callable[[str], ConfigError]) -> CostEntry:
    if not isinstance(raw, dict):
        raise damaged(f"entries[{n}] must be an object")
    required = ("shape", *ENTRY_INTS, "precision", "kernel", "ms_per_pack_step")
    missing = [name for name in required if name not in raw]
    if missing:
        raise damaged(f"entries[{n}]: missing field(s) {', '.join(missing)}")
    for name in ENTRY_INTS:
        if type(raw[name]) is not int or raw[name] < 1:
            raise damaged(f"entries[{n}].{name} must be a positive integer, got {raw[name]!r}")
    if raw["precision"] not in PRECISIONS:
        allowed = " or ".join(PRECISIONS)
        raise damaged(f"entries[{n}].precision must be {allowed}, got {raw['precision']!r}")
    for name in ("ms_per_pack_step", *ENTRY_OPTIONAL):
        value = raw.get(name)
        if value is None and name != "ms_per_pack_step":
            continue
        if type(value) not in (int, float) or not 0 < value < math.inf:
            raise damaged(f"entries[{n}].{name} must be a positive number, got {value!r}")
    return CostEntry(
        shape=str(raw["shape"]),
        precision=raw["precision"],
        kernel=str(raw["kernel"]),
        ms_per_pack_step=float(raw["ms_per_pack_step"]),
        **{name: raw[name] for name in ENTRY_INTS},
        **{name: _float(raw.get(name)) for name in ENTRY_OPTIONAL},
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def table_precision(precision: str) -> str:
    """The table's precision for a trial's: `auto` is what a GPU resolves it to (tf32)."""
    return resolve_precision(precision, "cuda")


def step_cost(
    table: CostTable, *, steps: int, hidden: int, batch: int, members: int, precision: str
) -> StepCost:
    """One pack step's cost from the entries of this hidden size, batch and precision.

    Pack size: a measured one exactly, else linear between the two measured neighbours; never
    beyond the measured sizes (a larger pack may need other kernels, or not stay resident).
    Sequence length: the nearest measured one, scaled linearly, since the kernels run one time
    step after another (the pixel-MNIST step, 784 steps, is 2-6x the copying one at 120).
    """
    wanted = table_precision(precision)
    if wanted not in PRECISIONS:
        raise ConfigError(f"precision: must be fp32, tf32 or auto, got {precision!r}")
    same = [
        e for e in table.entries if (e.hidden, e.batch, e.precision) == (hidden, batch, wanted)
    ]
    if not same:
        measured = sorted({f"H={e.hidden} B={e.batch} {e.precision}" for e in table.entries})
        raise ConfigError(
            f"{table.path.name}: no entry for H={hidden} B={batch} {wanted}; "
            f"measured: {', '.join(measured)}"
        )
    measured_steps = sorted({e.steps for e in same})
    nearest = min(measured_steps, key=lambda s: (abs(s - steps), -s))
    by_members = {e.members: e for e in same if e.steps == nearest}
    sizes = sorted(by_members)
    scale = steps / nearest
    scaled = None if nearest == steps else nearest
    if members in by_members:
        entry = by_members[members]
        return StepCost(
            ms_per_pack_step=entry.ms_per_pack_step * scale,
            eval_ms_per_pack_batch=_scaled(entry.eval_ms_per_pack_batch, scale),
            cudnn_step_ms=_scaled(entry.cudnn_step_ms, scale),
            start_ms=_scaled(entry.start_ms, scale),  # its warm-up steps are steps too
            between_members=None,
            scaled_from_steps=scaled,
        )
    if not sizes[0] < members < sizes[-1]:
        raise ConfigError(
            f"{table.path.name}: a pack of {members} at H={hidden} B={batch} {wanted} is outside "
            f"the measured pack sizes {sizes[0]}..{sizes[-1]} ({', '.join(map(str, sizes))})"
        )
    below = max(s for s in sizes if s < members)
    above = min(s for s in sizes if s > members)
    low, high = by_members[below], by_members[above]
    weight = (members - below) / (above - below)

    def between(a: float, b: float) -> float:
        return (a + weight * (b - a)) * scale

    def both(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else between(a, b)

    return StepCost(
        ms_per_pack_step=between(low.ms_per_pack_step, high.ms_per_pack_step),
        eval_ms_per_pack_batch=both(low.eval_ms_per_pack_batch, high.eval_ms_per_pack_batch),
        cudnn_step_ms=_scaled(low.cudnn_step_ms or high.cudnn_step_ms, scale),
        start_ms=both(low.start_ms, high.start_ms),
        between_members=(below, above),
        scaled_from_steps=scaled,
    )


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def step_ms(
    table: CostTable, *, steps: int, hidden: int, batch: int, members: int, precision: str
) -> float:
    """ms per pack step (interpolated in members, scaled in steps: step_cost)."""
    cost = step_cost(
        table, steps=steps, hidden=hidden, batch=batch, members=members, precision=precision
    )
    return cost.ms_per_pack_step


def sequence_length(task: str, options: dict[str, Any]) -> int | None:
    """The LSTM's sequence length for a task and its options, without building the task (which
    loads or draws its data); None when the task cannot tell."""
    from study.tasks import TASKS

    task_class = TASKS.get(task)
    return None if task_class is None else task_class.sequence_length(options)


def validation_size(task: str, options: dict[str, Any]) -> int | None:
    """Sequences in the validation split, read at every evaluation: the task's `val_size`
    option (capped by `subset`, as pixel MNIST takes it); None when the task has no such option.
    The test split is read only at a new best validation accuracy, which no plan can know."""
    from study.tasks import TASKS

    task_class = TASKS.get(task)
    size = None if task_class is None else task_class.option(options, "val_size")
    if not isinstance(size, int):
        return None
    subset = task_class.option(options, "subset")
    return min(size, subset) if isinstance(subset, int) else size


@dataclass(frozen=True)
class PackEstimate:
    pack_id: str
    members: int
    task: str
    steps: int
    hidden: int
    batch: int
    precision: str  # as the trials set it (auto, fp32, tf32)
    iterations: int
    cost: StepCost
    train_s: float
    eval_s: float | None  # None: the table has no evaluation cost for this pack
    start_s: float | None  # None: the table has no start-up cost for this pack

    @property
    def total_s(self) -> float:
        return self.train_s + (self.eval_s or 0.0) + (self.start_s or 0.0)


@dataclass(frozen=True)
class Unestimated:
    what: str  # a pack id, or the study
    trials: int
    reason: str


@dataclass(frozen=True)
class Estimate:
    table: CostTable
    study: str
    n_trials: int
    n_packs: int
    packs: tuple[PackEstimate, ...]
    unestimated: tuple[Unestimated, ...]

    @property
    def train_s(self) -> float:
        return sum(p.train_s for p in self.packs)

    @property
    def estimated_trials(self) -> int:
        """Trials in the packs the table could price (the rest are in `unestimated`)."""
        return sum(p.members for p in self.packs)

    @property
    def eval_included(self) -> bool:
        return bool(self.packs) and all(p.eval_s is not None for p in self.packs)

    @property
    def start_included(self) -> bool:
        return bool(self.packs) and all(p.start_s is not None for p in self.packs)

    @property
    def total_s(self) -> float:
        return sum(p.total_s for p in self.packs)


def estimate(plan: Plan, gpu: str, folder: Path | None = None) -> Estimate:
    """The study's GPU time on `gpu`: every pack's iterations x its step from the table, plus
    its evaluations where the table measured them. Packs run one after another on one GPU (a
    whole-GPU pack holds the device), so GPU-hours add up; N GPUs divide the wall time."""
    table = load_table(gpu, folder)
    name = plan.spec.name
    if plan.optuna:
        reason = (
            "an Optuna study suggests its trials one at a time and plans no packs, "
            "so there is nothing to look up"
        )
        return Estimate(
            table, name, plan.n_trials, 0, (), (Unestimated(name, plan.n_trials, reason),)
        )
    estimated: list[PackEstimate] = []
    skipped: list[Unestimated] = []
    for pack in plan.packs:
        try:
            estimated.append(_pack_estimate(table, pack))
        except ConfigError as error:
            skipped.append(Unestimated(pack.pack_id, len(pack.trials), str(error)))
    return Estimate(table, name, plan.n_trials, len(plan.packs), tuple(estimated), tuple(skipped))


def _pack_estimate(table: CostTable, pack: Pack) -> PackEstimate:
    config = pack.trials[0].config  # a pack's members share these fields (packed_train)
    if config.device == "cpu":  # `auto` trains on the GPU the table prices; `cpu` never does
        raise ConfigError("device cpu: its trials train on a CPU, which no GPU table prices")
    steps = sequence_length(config.task, config.task_options)
    if steps is None:
        raise ConfigError(
            f"task {config.task}: its sequence length is not known without building it"
        )
    members = len(pack.trials)
    cost = step_cost(
        table,
        steps=steps,
        hidden=config.hidden_size,
        batch=config.batch_size,
        members=members,
        precision=config.precision,
    )
    eval_s = None
    rows = validation_size(config.task, config.task_options)
    if cost.eval_ms_per_pack_batch is not None and rows is not None:
        from study.trial import EVAL_BATCH_SIZE

        # An evaluation every eval_every iterations and one at the end (train.py).
        evaluations = math.ceil(config.iterations / config.eval_every)
        batches = math.ceil(rows / EVAL_BATCH_SIZE)
        eval_s = evaluations * batches * cost.eval_ms_per_pack_batch / 1000
    return PackEstimate(
        pack_id=pack.pack_id,
        members=members,
        task=config.task,
        steps=steps,
        hidden=config.hidden_size,
        batch=config.batch_size,
        precision=config.precision,
        iterations=config.iterations,
        cost=cost,
        train_s=config.iterations * cost.ms_per_pack_step / 1000,
        eval_s=eval_s,
        start_s=None if cost.start_ms is None else cost.start_ms / 1000,
    )


@dataclass(frozen=True)
class Studies:
    """Several studies' estimates on one GPU: `study plan FOLDER --estimate` (the paper's whole
    study is search_spaces/paper/, one space per figure or panel)."""

    estimates: tuple[Estimate, ...]

    @property
    def total_s(self) -> float:
        return sum(e.total_s for e in self.estimates)

    @property
    def n_trials(self) -> int:
        return sum(e.n_trials for e in self.estimates)

    @property
    def estimated_trials(self) -> int:
        return sum(e.estimated_trials for e in self.estimates)

    @property
    def estimated_packs(self) -> int:
        return sum(len(e.packs) for e in self.estimates)

    @property
    def n_packs(self) -> int:
        return sum(e.n_packs for e in self.estimates)

    @property
    def complete(self) -> bool:
        """Every trial of every study priced (else the total is a lower bound)."""
        return self.estimated_trials == self.n_trials

    @property
    def _priced(self) -> list[Estimate]:
        return [e for e in self.estimates if e.packs]

    @property
    def eval_included(self) -> bool:
        return bool(self._priced) and all(e.eval_included for e in self._priced)

    @property
    def start_included(self) -> bool:
        return bool(self._priced) and all(e.start_included for e in self._priced)
