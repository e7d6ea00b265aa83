"""StudySpec -> one Plan: its trials (grid, random) in packs or its Optuna cells, the parameters'
roles and counts, computed once per run; and the `plan` text."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from study import pack_layout, vocabulary
from study.config import TrialConfig, resolve_precision
from study.errors import ConfigError
from study.overrides import overrides_text
from study.pack_layout import KNOWN_GPUS, GpuModel
from study.random_search import random_draws
from study.spec import AUTO_PACK, PARAMS, Range, StudySpec, trial_config

SCIENTIFIC, NUISANCE, FIXED, REPLICATE = "scientific", "nuisance", "fixed", "replicate"


@dataclass(frozen=True)
class PlannedTrial:
    """One trial of a grid or random study, known before it runs."""

    trial_id: str
    config: TrialConfig
    point: dict[str, Any]  # the varied parameters' values (scientific, nuisance, seed)


@dataclass(frozen=True)
class Cell:
    """One scientific x replicate point of an Optuna study; its nuisance axes are tuned inside."""

    index: int
    first_trial: int  # the trial number of its first sample (trial ids stay study-wide)
    n_samples: int
    point: dict[str, Any]  # scientific values
    seed: int
    # Nuisance axes tuned in this cell: a list (categorical) or a Range. p_detach is dropped for
    # method none, which never detaches.
    domains: dict[str, list[Any] | Range]

    def trial_ids(self) -> list[str]:
        return [trial_id(self.first_trial + k) for k in range(self.n_samples)]


@dataclass(frozen=True)
class Pack:
    """Trials of a grid or random study trained together as one batched model (one Ray trial)."""

    pack_id: str
    trials: tuple[PlannedTrial, ...]


@dataclass(frozen=True)
class Plan:
    """Everything a study runs, computed once (make_plan) for `plan`, the runner and tracking."""

    spec: StudySpec
    trials: tuple[PlannedTrial, ...]  # grid or random, in order; none for Optuna
    # The trials in packs of <= pack_size members (with pack 1, a pack per trial).
    packs: tuple[Pack, ...]
    cells: tuple[Cell, ...]  # Optuna's; none for grid or random
    roles: dict[str, str]  # every parameter's role, as the `role.<param>` tags of each trial
    # The GPU that `resources.pack: auto` sized the packs for (`--gpu`); None: no GPU, and auto
    # plans packs of 1, as CPU studies always ran.
    gpu: GpuModel | None = None
    # The most members a pack may have: resources.pack, or the largest size auto resolved to.
    pack_size: int = 1

    @property
    def optuna(self) -> bool:
        return self.spec.search.searcher == "optuna"

    @property
    def n_trials(self) -> int:
        if self.optuna:
            return sum(cell.n_samples for cell in self.cells)
        return len(self.trials)

    @property
    def packed(self) -> bool:
        """Whether trials train together (a pack size > 1), a Ray trial per pack."""
        return self.pack_size > 1


def make_plan(spec: StudySpec, gpu: GpuModel | None = None) -> Plan:
    """The study's one plan: trials and packs (grid, random) or cells (Optuna), and roles.

    `gpu` sizes `resources.pack: auto`; a study's every plan (run, resume, import, each job of
    `study plan --commands`) must be made for the same one, so that its packs are the same.
    """
    check_size(spec)
    if spec.resources.pack != AUTO_PACK:
        gpu = None  # an integer pack is the same on every machine: nothing to record or compare
    if spec.search.searcher == "optuna":  # one trial at a time: auto is 1, an integer > 1 refused
        return Plan(spec, (), (), tuple(_plan_cells(spec)), _roles(spec), gpu)
    trials = tuple(plan_trials(spec))
    pack = spec.resources.pack
    if pack == AUTO_PACK:
        sizes = [auto_pack_size(trial.config, gpu) for trial in trials]
        pack = max(sizes, default=1)
    else:
        sizes = [int(pack)] * len(trials)
    return Plan(spec, trials, _plan_packs(trials, sizes), (), _roles(spec), gpu, int(pack))


def auto_pack_size(config: TrialConfig, gpu: GpuModel | None) -> int:
    """`resources.pack: auto` for one trial: as many trials of its shape as `gpu` holds with
    every kernel program resident at once (pack_layout.resident_pack; issue 18: a pack of
    resident trials steps in about one trial's time). 1 without a GPU, and for a trial pinned
    to the CPU (device: cpu), which no GPU's SM count sizes."""
    if gpu is None or config.device == "cpu":
        return 1
    rows = _widest_rows(config.precision)
    return pack_layout.resident_pack(config.batch_size, config.hidden_size, gpu.sms, rows)


def _widest_rows(precision: str) -> int:
    """The most batch rows per split program for a trial's precision on a GPU: full fp32 spills
    registers beyond 32 rows, tf32 (what auto is on a GPU) compiles to 128
    (pack_layout.WIDEST_ROWS), so an fp32 pack holds fewer trials."""
    return pack_layout.widest_rows(resolve_precision(precision, "cuda"))


def gpu_label(gpu: GpuModel) -> str:
    """How `plan` names a GPU: its --gpu key, or this machine's device by name."""
    return gpu.key if gpu.key in KNOWN_GPUS else gpu.name


def gpu_record(gpu: GpuModel | None) -> dict[str, Any] | None:
    """The GPU a plan was sized for, as JSON (a parent run's tag, a result file), so a resume
    or an import plans the same packs on any machine."""
    return None if gpu is None else {"key": gpu.key, "name": gpu.name, "sms": gpu.sms}


def gpu_from_record(value: Any) -> GpuModel | None:
    """gpu_record's value read back; ValueError if it is not one."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("sms"), int) or value["sms"] < 1:
        raise ValueError(f"not a GPU record {{key, name, sms}}: {value!r}")
    return GpuModel(str(value["key"]), str(value["name"]), value["sms"])


def count_trials(spec: StudySpec) -> tuple[int, str]:
    """(at most how many trials the study plans, the factors that make it), from the axes'
    lengths alone: a grid is never expanded to be counted. Method none counts its p_detach axis
    once (plan_trials collapses it to 0); repeated values are counted as given."""
    grid = dict(spec.scientific)
    if spec.search.searcher == "grid":
        grid.update(spec.nuisance)
    lengths = {param: len(axis) for param, axis in grid.items() if isinstance(axis, list)}
    factors = [f"{param} {length}" for param, length in lengths.items()]
    count = math.prod(lengths.values())
    # A method sampled per trial (random, optuna) may or may not be none: counted in full.
    sampled = "method" not in lengths and isinstance(spec.nuisance.get("method"), (list, Range))
    if "p_detach" in lengths and not sampled:
        methods = grid.get("method", spec.fixed.get("method", "none"))
        methods = methods if isinstance(methods, list) else [methods]
        # The method and p_detach factors together: one point under none, len(p_detach) else.
        per_p = lengths.get("p_detach", 1)
        pairs = sum(1 if method == "none" else per_p for method in methods)
        others = [n for param, n in lengths.items() if param not in ("method", "p_detach")]
        count = math.prod(others) * pairs
        if "none" in methods and per_p > 1:
            factors.append("(p_detach once under method none)")
    if spec.search.searcher != "grid":
        count *= spec.search.samples_per_cell
        factors.append(f"samples_per_cell {spec.search.samples_per_cell}")
    factors.append(f"seeds {len(spec.seeds)}")
    return count * len(spec.seeds), " x ".join(factors)


def check_size(spec: StudySpec) -> None:
    """Refuse, in one line and at once, a study larger than resources.max_trials: expanding a
    grid of millions takes minutes without a word, and no study of them would finish."""
    count, factors = count_trials(spec)
    limit = spec.resources.max_trials
    if count > limit:
        raise ConfigError(
            f"{spec.source}: {count:,} trials ({factors}), more than resources.max_trials "
            f"{limit:,}; shrink an axis, or set resources.max_trials: {count} to plan them all"
        )


def trial_id(number: int) -> str:
    return f"t{number:04d}"


def pack_id(number: int) -> str:
    return f"p{number:04d}"


def _roles(spec: StudySpec) -> dict[str, str]:
    """Role of every parameter as logged to MLflow (`role.<param>` tags); task options are named
    as in the flattened params (`task_options.T`)."""
    result = {"task": FIXED, **{param: spec.role_of(param) for param in PARAMS}}
    result.update({f"task_options.{o}": spec.role_of(o) for o in _used_options(spec)})
    result["seed"] = REPLICATE
    return result


def _used_options(spec: StudySpec) -> list[str]:
    options = set(spec.task_option_names)
    varied = [p for p in (*spec.scientific, *spec.nuisance, *spec.fixed) if p in options]
    return list(dict.fromkeys([*spec.task_options, *varied]))


def _grid(axes: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the axes, first axis slowest (YAML order)."""
    values = [axis if isinstance(axis, list) else [axis] for axis in axes.values()]
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*values)]


def plan_trials(spec: StudySpec) -> list[PlannedTrial]:
    """The trials of a grid or random study, in order, with ids t0000, t0001, ...

    Seeds vary fastest, so consecutive trials are the replicates of one cell.
    """
    if spec.search.searcher == "optuna":
        raise ValueError("an Optuna study is planned as cells; use make_plan")
    if spec.search.searcher == "grid":
        points = [{**s, **n} for s in _grid(spec.scientific) for n in _grid(spec.nuisance)]
    else:
        draws = random_draws(spec)
        points = [{**s, **n} for s in _grid(spec.scientific) for n in draws]
    trials: list[PlannedTrial] = []
    seen: set[str] = set()
    for point in points:
        for seed in spec.seeds:
            try:
                config = trial_config(spec, point, seed)
            except ConfigError as error:
                # A combination of values each fine alone (load_spec probes them one by one).
                shown = ", ".join(f"{k}={vocabulary.format_value(v)}" for k, v in point.items())
                raise ConfigError(f"{spec.source}: the grid point {shown}: {error}") from None
            key = json.dumps(config.to_dict(), sort_keys=True)
            if key in seen:  # e.g. method none with a p_detach axis collapses to p_detach 0
                continue
            seen.add(key)
            shown = {**_effective(point, config), "seed": seed}
            trials.append(PlannedTrial(trial_id(len(trials)), config, shown))
    return trials


def _plan_packs(trials: Sequence[PlannedTrial], sizes: Sequence[int]) -> tuple[Pack, ...]:
    """The trials grouped into packs, in plan order; `sizes[i]`: the most members the pack of
    trial i may have (equal across a group: auto sizes by shape, which the group shares).

    A trial joins the newest unfilled pack of its group, else opens one; packs are numbered by
    their first trial. With size 1 every trial is a pack of one.
    """
    if max(sizes, default=1) == 1:  # what the grouping below gives, without importing torch
        return tuple(Pack(pack_id(number), (trial,)) for number, trial in enumerate(trials))
    from study.packed_train import pack_key  # torch-heavy, as the task checks already are

    packs: list[list[PlannedTrial]] = []
    open_packs: dict[str, list[PlannedTrial]] = {}
    for trial, size in zip(trials, sizes, strict=True):
        # Task options join the key: members with other options (T, data) may differ in shape,
        # which only building the task would tell.
        options = sorted(trial.config.task_options.items())
        group = json.dumps([pack_key(trial.config), options], default=str)
        members = open_packs.get(group)
        if members is None or len(members) == size:
            members = open_packs[group] = []
            packs.append(members)
        members.append(trial)
    return tuple(Pack(pack_id(number), tuple(members)) for number, members in enumerate(packs))


def _effective(point: dict[str, Any], config: TrialConfig) -> dict[str, Any]:
    """The point as the trial sees it (p_detach after the method-none collapse)."""
    shown = dict(point)
    if "p_detach" in shown:
        shown["p_detach"] = config.p_detach
    return shown


def _plan_cells(spec: StudySpec) -> list[Cell]:
    """The scientific x replicate cells of an Optuna study, samples_per_cell trials each."""
    cells: list[Cell] = []
    first = 0
    seen: list[dict[str, Any]] = []
    for point in _grid(spec.scientific):
        domains = {p: a for p, a in spec.nuisance.items() if isinstance(a, (list, Range))}
        if point.get("method", spec.fixed.get("method", "none")) == "none":
            domains.pop("p_detach", None)
            if "p_detach" in point:  # as plan_trials: vanilla's p_detach axis collapses to 0
                point = {**point, "p_detach": 0.0}
        if point in seen:
            continue
        seen.append(point)
        # Nothing left to tune (e.g. only p_detach, under method none): one trial is enough.
        n_samples = spec.search.samples_per_cell if domains else 1
        for seed in spec.seeds:
            cells.append(Cell(len(cells), first, n_samples, point, seed, domains))
            first += n_samples
    return cells


def cell_config(spec: StudySpec, cell: Cell, nuisance: dict[str, Any]) -> TrialConfig:
    """The TrialConfig of one Optuna sample: the cell's point plus the sampled nuisance. A tuned
    parameter not in `nuisance` (the base config of a cell, before any sample) takes its
    domain's first value, which every sample replaces (sample_config)."""
    fixed_nuisance = {p: a for p, a in spec.nuisance.items() if p not in cell.domains}
    unsampled = {
        p: axis.min if isinstance(axis, Range) else axis[0]
        for p, axis in cell.domains.items()
        if p not in nuisance
    }
    point = {**cell.point, **fixed_nuisance, **unsampled, **nuisance}
    return trial_config(spec, point, cell.seed)


def format_value(value: Any) -> str:
    """A setting or a whole axis as `plan` prints it: vocabulary's format, and a sampled range."""
    if isinstance(value, Range):
        return f"{value.scaling}[{value.min:g}, {value.max:g}]"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return vocabulary.format_value(value)


def format_point(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={vocabulary.format_value(v)}" for k, v in point.items())


def plan_text(plan: Plan) -> str:
    """What `study plan` prints: the count (as `N trials`), the axes and every trial or cell."""
    spec = plan.spec
    variant = " (smoke)" if spec.smoke else ""
    options = " ".join(f"{k}={format_value(v)}" for k, v in spec.task_options.items())
    lines = [
        f"{spec.name}{variant}: {plan.n_trials} trials, searcher {spec.search.searcher}, "
        f"task {spec.task} {options}".rstrip(),
    ]
    for label, axes in (("scientific", spec.scientific), ("nuisance", spec.nuisance)):
        shown = "; ".join(f"{k} {format_value(v)}" for k, v in axes.items()) or "-"
        lines.append(f"  {label}: {shown}")
    lines.append(f"  replicates: seeds {format_value(list(spec.seeds))}")
    lines.append(f"  fixed: {format_point(spec.fixed) or '-'}")
    if spec.overrides:
        lines.append(f"  overrides (--set): {overrides_text(spec.overrides)}")
    if spec.base_iterations and "iterations" in spec.fixed:
        fraction = spec.fixed["iterations"] / spec.base_iterations
        lines.append(f"  budget: {100 * fraction:.3g}% of the space's {spec.base_iterations} its")
    lines.extend(_auto_pack_lines(plan))
    for claim in spec.claims:
        compared = claim.method + (f" vs {claim.baseline}" if claim.baseline else "")
        where = f" where {format_point(claim.where)}" if claim.where else ""
        lines.append(
            f'  claim {claim.id} (Fig. {claim.figure}): "{claim.claim}": {claim.statistic} '
            f"{compared}{where}, expected {claim.expect}"
        )
    if plan.optuna:
        lines.append(
            f"  {len(plan.cells)} cells (scientific x seeds), Optuna tunes the nuisance "
            f"axes in each for {spec.search.metric} ({spec.search.mode}), "
            f"seed {spec.search.seed}:"
        )
        for cell in plan.cells:
            ids = cell.trial_ids()
            span = ids[0] if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"
            point = format_point({**cell.point, "seed": cell.seed})
            lines.append(f"  {span}  {point}: {cell.n_samples} samples")
    elif plan.packed:
        packs = f"{len(plan.packs)} pack{'s' if len(plan.packs) > 1 else ''}"
        lines.append(
            f"  {plan.n_trials} trials in {packs} of <= {plan.pack_size} "
            "(one batched model and one Ray trial per pack):"
        )
        pack_of = {t.trial_id: p.pack_id for p in plan.packs for t in p.trials}
        for trial in plan.trials:
            point = format_point(trial.point)
            lines.append(f"  {trial.trial_id}  {pack_of[trial.trial_id]}  {point}")
    else:
        for trial in plan.trials:
            lines.append(f"  {trial.trial_id}  {format_point(trial.point)}")
    return "\n".join(lines)


def plans_total(plans: Sequence[Plan]) -> str:
    """The line after several plans (`study plan FOLDER`): their trials and packs added up."""
    trials = sum(plan.n_trials for plan in plans)
    packs = sum(len(plan.packs) for plan in plans if not plan.optuna)
    tuned = sum(1 for plan in plans if plan.optuna)
    optuna = f"; {tuned} Optuna {'study' if tuned == 1 else 'studies'}, unpacked" if tuned else ""
    return f"all {len(plans)} studies: {trials} trials in {packs} packs{optuna}"


def _auto_pack_lines(plan: Plan) -> list[str]:
    """What `resources.pack: auto` resolved to, one line per trial shape, and why."""
    if plan.spec.resources.pack != AUTO_PACK:
        return []
    if plan.optuna:
        return ["  packs: auto -> 1 (the optuna searcher suggests one trial at a time)"]
    gpu = plan.gpu
    if gpu is None:
        return ["  packs: auto -> 1 (planned without a GPU; --gpu NAME sizes packs for one)"]
    lines: list[str] = []
    shapes = dict.fromkeys(
        (c.batch_size, c.hidden_size, c.precision, c.device == "cpu")
        for c in (t.config for t in plan.trials)
    )
    for batch, hidden, precision, on_cpu in shapes:
        where = f"at batch {batch}, hidden {hidden}"
        if on_cpu:
            lines.append(f"  packs: auto -> 1 {where} (device cpu: no GPU to fill)")
            continue
        if hidden > pack_layout.MAX_HIDDEN:
            why = f"hidden > {pack_layout.MAX_HIDDEN}: the row kernels, a trial at a time"
            lines.append(f"  packs: auto -> 1 trial per pack on {gpu_label(gpu)} {where} ({why})")
            continue
        rows = _widest_rows(precision)
        size = pack_layout.resident_pack(batch, hidden, gpu.sms, rows)
        trials = "trial" if size == 1 else "trials"
        widest = pack_layout.layouts(batch, max_rows=rows)[-1]
        programs = widest.programs(batch, hidden)
        lines.append(
            f"  packs: auto -> {size} {trials} per pack on {gpu_label(gpu)} ({gpu.sms} SMs; "
            f"{programs} program{'s' if programs > 1 else ''} of {widest.rows} rows per trial "
            f"{where}, precision "
            f"{resolve_precision(precision, 'cuda')})"
        )
    return lines


def sample_config(
    base: dict[str, Any], nuisance: dict[str, Any], option_names: Sequence[str]
) -> TrialConfig:
    """An Optuna sample as a TrialConfig: the cell's base config with the sampled nuisance values
    (task options among them go into task_options)."""
    values = {**base, "task_options": dict(base.get("task_options", {}))}
    for param, value in nuisance.items():
        if param in option_names:
            values["task_options"][param] = value
        else:
            values[param] = value
    if values.get("method") == "none":
        values["p_detach"] = 0.0
    return TrialConfig.from_dict(values)
