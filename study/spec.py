"""StudySpec: a search-space YAML loaded, smoke-merged, `--set`-overridden and validated with
one-line errors (the value checks live in spec_checks.py, the claims' in claim_spec.py)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from study.claim_spec import Claim, parse_claims
from study.config import TrialConfig, check_schedule
from study.errors import ConfigError
from study.methods import METHODS
from study.overrides import (
    AXIS_SECTIONS,
    PARAM_SECTIONS,
    apply_overrides,
    checked_together,
    overrides_hash,
    parse_overrides,
)
from study.spec_checks import MAX_SEARCH_SEED, PARAMS, Axis, Checker, Range, UniqueKeyLoader

SECTIONS = (*PARAM_SECTIONS, "replicates", "search", "resources", "target", "claims", "smoke")
SEARCHERS = ("grid", "random", "optuna")
METRICS = ("val/accuracy", "val/loss", "best/val_accuracy")
DEFAULT_MAX_FAILURES = 2
AUTO_GPUS = "auto"  # resources.gpus: one GPU per trial where the cluster has GPUs
AUTO_PACK = "auto"  # resources.pack: the most trials whose kernels stay resident on the GPU
# Past it `plan` and `run` refuse, naming the count, before expanding the grid (minutes).
MAX_TRIALS = 100_000
# A trial's CPUs are its torch threads (and GPUs its devices): beyond any machine's, torch and
# Ray overflow.
MAX_CPUS = 4096


@dataclass(frozen=True)
class Search:
    searcher: str = "grid"
    samples_per_cell: int = 1
    seed: int = 0
    metric: str = "val/accuracy"
    mode: str = "max"


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    # GPUs per Ray trial (a pack is one trial), or "auto": 1 where the Ray cluster has GPUs,
    # else 0, so one search space runs on a laptop and on a GPU cluster (with `device: auto`).
    gpus: float | str = 0.0
    max_concurrent: int | None = None
    max_failures: int = DEFAULT_MAX_FAILURES
    # Trials trained together as one batched model (study.packed_train), or "auto": per pack
    # group, as many as the GPU the plan is sized for holds resident at once (space.make_plan).
    pack: int | str = 1
    max_trials: int = MAX_TRIALS  # a larger study must say so (study.space.check_size)


@dataclass(frozen=True)
class StudySpec:
    """One study. Parameter names are TrialConfig fields or options of the task."""

    name: str
    source: str  # the YAML file it came from
    smoke: bool  # whether the `smoke` overrides were merged in
    task: str
    task_options: dict[str, Any]  # fixed task options from `task:`
    fixed: dict[str, Any]  # parameter -> value (includes model.hidden_size)
    scientific: dict[str, Axis]
    nuisance: dict[str, Axis]
    seeds: tuple[int, ...]
    search: Search
    resources: Resources
    target: float | None
    raw: dict[str, Any]  # the resolved YAML mapping (smoke merged, smoke section dropped)
    claims: tuple[Claim, ...] = ()
    # `--set KEY=VALUE` pairs applied on top of the file (and its smoke variant), in order.
    overrides: tuple[tuple[str, Any], ...] = ()
    # fixed.iterations of the file's full variant without overrides: the paper's budget, against
    # which a smaller run's budget fraction is reported. None where iterations is not fixed.
    base_iterations: int | None = None

    @property
    def task_option_names(self) -> tuple[str, ...]:
        return task_option_names(self.task)

    def role_of(self, param: str) -> str:
        if param in self.scientific:
            return "scientific"
        if param in self.nuisance:
            return "nuisance"
        return "fixed"

    def spec_hash(self) -> str:
        """A short hash of the resolved spec: two runs with the same hash ran the same study."""
        text = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _gpus(check: Checker, value: Any) -> float | str:
    if value == AUTO_GPUS:
        return AUTO_GPUS
    try:
        return check.number("resources.gpus", value, maximum=MAX_CPUS)
    except ConfigError:
        message = f"must be a number from 0 to {MAX_CPUS} or {AUTO_GPUS}, got {value!r}"
        raise check.error("resources.gpus", message) from None


def _pack(check: Checker, value: Any) -> int | str:
    if value == AUTO_PACK:
        return AUTO_PACK
    try:
        return check.integer("resources.pack", value, minimum=1)
    except ConfigError:
        if not isinstance(value, str):  # 0, 2.5, yes: the integer check's own words say it
            raise
        message = f"must be an integer >= 1 or {AUTO_PACK}, got {value!r}"
        raise check.error("resources.pack", message) from None


def task_option_names(task: str) -> tuple[str, ...]:
    from study.tasks import TASKS  # torch-heavy: imported when a spec is checked, not on import

    signature = inspect.signature(TASKS[task].__init__)
    return tuple(name for name in signature.parameters if name != "self")


def load_spec(
    path: str | Path,
    smoke: bool = False,
    overrides: Sequence[str] = (),
    name: str | None = None,
) -> StudySpec:
    """Read and validate a search-space YAML; ConfigError names the file and the field.

    `overrides` are `--set KEY=VALUE` texts. The study is named after the file; with overrides
    it is another study (`NAME-set-HASH`) unless `name` says otherwise, so a cut-down run never
    mixes with the full-budget study of the same file.
    """
    path = Path(path)
    if str(path).strip() in ("", "."):
        # `study plan ""` arrives as Path(".") (the CLI's type=Path), a folder, not a typo'd file.
        raise ConfigError(
            "no search space file given (the path is empty or '.'); "
            "give a YAML file such as search_spaces/quick.yaml"
        )
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except OSError as error:
        raise ConfigError(f"{where}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{where}: must be UTF-8 text, found byte 0x{error.object[error.start]:02x} at "
            f"offset {error.start}; save the file as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({line}{problem})") from None
    pairs = parse_overrides(overrides)
    if name is None:
        name = path.stem if not pairs else f"{path.stem}-set-{overrides_hash(pairs)}"
    return spec_from_mapping(raw, name=name, where=where, smoke=smoke, overrides=pairs)


def space_files(paths: Sequence[str | Path]) -> list[Path]:
    """The search-space files that SPACE arguments name: a file as given, a folder as the
    .yaml files directly in it, by name (`study plan search_spaces/paper`: one per figure).
    A folder with none is a one-line error; a file named twice counts once."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not inside:
                raise ConfigError(f"{path}: a folder with no search spaces (*.yaml) in it")
            files.extend(inside)
        else:
            files.append(path)
    unique: dict[Path, Path] = {}
    for file in files:
        unique.setdefault(file.resolve(), file)
    return list(unique.values())


def spec_from_mapping(
    raw: Any,
    name: str,
    where: str,
    smoke: bool = False,
    overrides: Sequence[tuple[str, Any]] = (),
    base_iterations: int | None = None,
) -> StudySpec:
    """Validate a parsed YAML mapping (also used to reload the resolved spec of a study, with
    the overrides and base budget its record kept)."""
    check = Checker(where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)})")
    check.keys("", raw, SECTIONS)
    if "task" not in raw:
        raise ConfigError(f"{where}: field task: missing; give at least task: {{name: copying}}")
    if smoke and raw.get("smoke") in (None, {}):
        # Running the full study labelled "(smoke)" would be a silent, costly surprise.
        what = "no smoke section" if raw.get("smoke") is None else "an empty smoke section"
        raise ConfigError(f"{where}: --smoke asks for the smoke variant, but the file has {what}")
    smoke_section = raw.get("smoke") or {}
    check.mapping("smoke", smoke_section)
    check.keys("smoke", smoke_section, [s for s in SECTIONS if s not in ("smoke", "claims")])
    full = {k: v for k, v in raw.items() if k != "smoke"}
    # Both variants are built on every load, so a broken smoke section fails the full study's
    # validation too (CI only runs the smoke variant).
    full_spec = _build(full, name, where, smoke=False)
    try:
        smoke_spec = _build(_merge(full, smoke_section, check), name, where, smoke=True)
    except ConfigError as error:
        # Name the variant: the bad value may come from the smoke section or meet it there.
        message = str(error).replace(f"{where}: ", f"{where}: smoke variant: ", 1)
        raise ConfigError(message) from None
    spec = smoke_spec if smoke else full_spec
    if base_iterations is None:
        fixed = full_spec.fixed.get("iterations")
        base_iterations = fixed if isinstance(fixed, int) else None
    spec = dataclasses.replace(spec, base_iterations=base_iterations)
    if not overrides:
        return spec

    def build(pairs: tuple[tuple[str, Any], ...], label: str) -> StudySpec:
        overridden = apply_overrides(spec.raw, pairs, label)
        Checker(label).keys("", overridden, [s for s in SECTIONS if s != "smoke"])
        return _build(overridden, name, label, smoke=smoke, overridden=True)

    overridden = checked_together(build, tuple(overrides), where)
    return dataclasses.replace(
        overridden, source=where, overrides=tuple(overrides), base_iterations=base_iterations
    )


def _merge(base: dict[str, Any], overrides: dict[str, Any], check: Checker) -> dict[str, Any]:
    """Section-wise merge: mapping sections update key by key, `target` is replaced."""
    merged = copy.deepcopy(base)
    for section, value in overrides.items():
        if section == "target":
            merged["target"] = value
            continue
        check.mapping(f"smoke.{section}", value)
        merged[section] = {**(merged.get(section) or {}), **copy.deepcopy(value or {})}
    return merged


def _build(
    raw: dict[str, Any], name: str, where: str, smoke: bool, overridden: bool = False
) -> StudySpec:
    from study.tasks import TASKS

    check = Checker(where)
    task_section = raw.get("task")
    check.mapping("task", task_section)
    task_section = task_section or {}
    task = task_section.get("name")
    if task is None:
        raise check.error("task.name", f"missing; allowed: {', '.join(TASKS)}")
    if not isinstance(task, str) or task not in TASKS:
        raise check.error("task.name", f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    option_names = task_option_names(task)
    task_options = {k: v for k, v in task_section.items() if k != "name"}
    check.keys("task", task_options, ["name", *option_names])
    for key, value in task_options.items():
        if isinstance(value, (list, dict)):
            raise check.error(
                f"task.{key}",
                f"task options are fixed; to vary {key}, put it under scientific or nuisance",
            )

    model = raw.get("model") or {}
    check.mapping("model", model)
    check.keys("model", model, ["hidden_size"])
    fixed: dict[str, Any] = {}
    if "hidden_size" in model:
        hidden_size = model["hidden_size"]
        fixed["hidden_size"] = check.value("model.hidden_size", "hidden_size", hidden_size)

    names = (*PARAMS, *option_names)
    sections: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {"hidden_size": "model"} if fixed else {}
    for key in task_options:
        seen[key] = "task"
    for section in AXIS_SECTIONS:
        values = raw.get(section) or {}
        check.mapping(section, values)
        check.keys(section, values, names)
        parsed: dict[str, Any] = {}
        for param, value in values.items():
            if param in seen:
                raise check.error(
                    f"{section}.{param}",
                    f"already set in {seen[param]}; a parameter has exactly one role",
                )
            seen[param] = section
            parsed[param] = check.axis(section, param, value, option_names)
        sections[section] = parsed
    fixed.update(sections["fixed"])

    replicates = raw.get("replicates") or {}
    check.mapping("replicates", replicates)
    check.keys("replicates", replicates, ["seeds"])
    seeds = check.seeds(replicates.get("seeds", 1))

    search_raw = raw.get("search") or {}
    check.mapping("search", search_raw)
    check.keys("search", search_raw, [f.name for f in dataclasses.fields(Search)])
    search = Search(
        searcher=check.choice("search.searcher", search_raw.get("searcher", "grid"), SEARCHERS),
        samples_per_cell=check.integer(
            "search.samples_per_cell", search_raw.get("samples_per_cell", 1), minimum=1
        ),
        seed=check.integer(
            "search.seed", search_raw.get("seed", 0), minimum=0, maximum=MAX_SEARCH_SEED
        ),
        metric=check.choice("search.metric", search_raw.get("metric", "val/accuracy"), METRICS),
        mode=check.choice("search.mode", search_raw.get("mode", "max"), ("max", "min")),
    )
    _check_search(check, search, sections)

    resources_raw = raw.get("resources") or {}
    check.mapping("resources", resources_raw)
    check.keys("resources", resources_raw, [f.name for f in dataclasses.fields(Resources)])
    max_concurrent = resources_raw.get("max_concurrent")
    resources = Resources(
        cpus=check.number("resources.cpus", resources_raw.get("cpus", 1), True, MAX_CPUS),
        gpus=_gpus(check, resources_raw.get("gpus", 0)),
        max_concurrent=None
        if max_concurrent is None
        else check.integer("resources.max_concurrent", max_concurrent, minimum=1),
        max_failures=check.integer(
            "resources.max_failures",
            resources_raw.get("max_failures", DEFAULT_MAX_FAILURES),
            minimum=0,
        ),
        pack=_pack(check, resources_raw.get("pack", 1)),
        max_trials=check.integer(
            "resources.max_trials", resources_raw.get("max_trials", MAX_TRIALS), minimum=1
        ),
    )
    # `auto` is allowed (it plans packs of 1 there): a paper space may switch searchers.
    if resources.pack != AUTO_PACK and resources.pack > 1 and search.searcher == "optuna":
        raise check.error(
            "resources.pack",
            "the optuna searcher suggests one trial at a time, so pack must be 1; "
            "packing needs search.searcher grid or random",
        )
    target = raw.get("target")
    if target is not None:
        target = check.number("target", target)
        if not 0.0 < target <= 1.0:
            raise check.error("target", f"must be a validation accuracy in (0, 1], got {target}")

    spec = StudySpec(
        name=name,
        source=where,
        smoke=smoke,
        task=task,
        task_options=task_options,
        fixed=fixed,
        scientific=sections["scientific"],
        nuisance=sections["nuisance"],
        seeds=seeds,
        search=search,
        resources=resources,
        target=target,
        raw=raw,
        claims=parse_claims(raw.get("claims"), check, names),
    )
    _probe_values(spec, check, overridden)
    return spec


def _check_search(check: Checker, search: Search, sections: dict[str, dict[str, Any]]) -> None:
    for param, axis in sections["scientific"].items():
        if isinstance(axis, Range):
            raise check.error(
                f"scientific.{param}",
                "scientific axes are compared, not sampled: give a list of values; "
                "{min, max} ranges belong under nuisance",
            )
    ranges = [p for p, axis in sections["nuisance"].items() if isinstance(axis, Range)]
    axes = [p for p, axis in sections["nuisance"].items() if isinstance(axis, (list, Range))]
    if search.searcher != "grid" and not axes:
        raise check.error(
            "nuisance",
            f"the {search.searcher} searcher samples the nuisance axes; give at least one "
            "(a list or a {min, max} range)",
        )
    if search.searcher == "grid":
        if ranges:
            raise check.error(
                f"nuisance.{ranges[0]}",
                "a {min, max} range needs search.searcher random or optuna; grid takes a list",
            )
        if search.samples_per_cell != 1:
            raise check.error(
                "search.samples_per_cell",
                "only random and optuna searchers sample; with grid it must be 1",
            )


def _probe_values(spec: StudySpec, check: Checker, overridden: bool = False) -> None:
    """Build a TrialConfig for every listed value (and range end) so TrialConfig's own checks
    run, and report a bad value under the section that holds it."""
    first = {p: _values(a)[0] for p, a in {**spec.scientific, **spec.nuisance}.items()}
    base = {**spec.fixed, **first}
    locations = {p: "fixed" for p in spec.fixed}
    if "hidden_size" in spec.fixed and "hidden_size" in (spec.raw.get("model") or {}):
        locations["hidden_size"] = "model"
    locations.update({p: "scientific" for p in spec.scientific})
    locations.update({p: "nuisance" for p in spec.nuisance})
    locations.update({o: "task" for o in spec.task_options})
    probes: list[tuple[str, Any]] = [(p, v) for p, v in spec.fixed.items()]
    for param, axis in {**spec.scientific, **spec.nuisance}.items():
        probes.extend((param, value) for value in _values(axis))
    probes.extend((o, v) for o, v in spec.task_options.items())
    probes.append(("", None))  # the base point itself
    method_axis = {**spec.scientific, **spec.nuisance}.get("method", [])
    methods = [m for m in _values(method_axis) if m != "none"]
    unused = [v for p, v in probes if p == "p_detach" and v != 0]
    # p is forced to 0 under method none: a file that names one for it alone says something it
    # does not train. A --set to method none (vanilla only, of a space with p) means it.
    if unused and not overridden and not methods and base.get("method", "none") == "none":
        message = "but no method of this space detaches: add h_detach or c_detach, or drop it"
        raise check.error(f"{locations['p_detach']}.p_detach", f"{unused[0]!r}, {message}")
    for param, value in probes:
        point = dict(base)
        if param:
            point[param] = value
        if param == "p_detach" and point.get("method", "none") == "none":
            # `none` would force p to 0 and hide a bad value; probe it with a detaching method.
            point["method"] = methods[0] if methods else "h_detach"
        try:
            trial_config(spec, point, seed=spec.seeds[0])
        except ConfigError as error:
            field, _, message = str(error).partition(": ")
            field = field.removeprefix("task_options.")
            if field in locations:
                raise check.error(f"{locations[field]}.{field}", message) from None
            if field in PARAMS:  # a parameter no section sets (p_detach of a detaching method)
                raise check.error(field, message) from None
            raise ConfigError(f"{spec.source}: {error}") from None


def _values(axis: Axis) -> list[Any]:
    if isinstance(axis, list):
        return axis
    if isinstance(axis, Range):
        return [axis.min, axis.max]
    return [axis]


def trial_config(spec: StudySpec, point: dict[str, Any], seed: int) -> TrialConfig:
    """The TrialConfig of one point (varied parameter -> value) of the space, fixed values added.

    Method `none` never detaches, so its p_detach is forced to 0 (the grid then dedupes); any
    other method needs one.
    """
    options = set(spec.task_option_names)
    values: dict[str, Any] = {"task": spec.task, "seed": seed}
    task_options = dict(spec.task_options)
    for param, value in {**spec.fixed, **point}.items():
        if param in options:
            task_options[param] = value
        else:
            values[param] = value
    values["task_options"] = task_options
    method = values.get("method", "none")
    if method == "none":
        values["p_detach"] = 0.0
    elif "p_detach" not in values and method in METHODS:  # (an unknown one: from_dict says so)
        # Defaulting to 0 would train a plain LSTM under the method's name.
        raise ConfigError(
            f"p_detach: missing; method {method} blocks gradients with probability p_detach: "
            "set it under fixed, scientific or nuisance (the paper's choice: 0.25)"
        )
    return check_schedule(TrialConfig.from_dict(values, where=spec.source))
