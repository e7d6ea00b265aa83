"""StudySpec: a search-space YAML loaded, smoke-merged and validated with one-line errors."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import math
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from study.config import FLOAT_FIELDS, INT_FIELDS, NULLABLE_FIELDS, ConfigError, TrialConfig
from study.methods import METHODS

SECTIONS = (
    "task",
    "model",
    "fixed",
    "scientific",
    "nuisance",
    "replicates",
    "search",
    "resources",
    "target",
    "smoke",
)
AXIS_SECTIONS = ("fixed", "scientific", "nuisance")
SEARCHERS = ("grid", "random", "optuna")
METRICS = ("val/accuracy", "val/loss", "best/val_accuracy")
SCALINGS = ("log", "linear")
# Trial fields a search space may set; task/task_options come from `task:`, seed from replicates.
PARAMS = tuple(
    f.name
    for f in dataclasses.fields(TrialConfig)
    if f.name not in ("task", "task_options", "seed")
)
# What null means for each of config.NULLABLE_FIELDS, for error hints.
NULL_MEANS = {"clip_norm": "no clipping", "anneal_last": "no annealing"}
DEFAULT_MAX_FAILURES = 2
AUTO_GPUS = "auto"  # resources.gpus: one GPU per trial where the cluster has GPUs


@dataclass(frozen=True)
class Range:
    """A sampled axis `{min, max, scaling}`: drawn by the random or Optuna searcher."""

    min: float
    max: float
    scaling: str = "linear"


# An axis value: a list (grid axis), a Range, or one scalar (a single fixed value).
Axis = Any


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
    pack: int = 1  # trials trained together as one batched model (study.packed_train)


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


def _gpus(check: _Checker, value: Any) -> float | str:
    if value == AUTO_GPUS:
        return AUTO_GPUS
    try:
        return check.number("resources.gpus", value)
    except ConfigError:
        message = f"must be a number >= 0 or {AUTO_GPUS}, got {value!r}"
        raise check.error("resources.gpus", message) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in a mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may repeat, and its keys may be overridden
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports an unhashable key itself
            line = key_node.start_mark.line + 1
            if key in lines:
                problem = f"duplicate key {key!r}, first on line {lines[key]}"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def task_option_names(task: str) -> tuple[str, ...]:
    from study.tasks import TASKS  # torch-heavy: imported when a spec is checked, not on import

    signature = inspect.signature(TASKS[task].__init__)
    return tuple(name for name in signature.parameters if name != "self")


def load_spec(path: str | Path, smoke: bool = False) -> StudySpec:
    """Read and validate a search-space YAML; ConfigError names the file and the field."""
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
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({line}{problem})") from None
    return spec_from_mapping(raw, name=path.stem, where=where, smoke=smoke)


def spec_from_mapping(raw: Any, name: str, where: str, smoke: bool = False) -> StudySpec:
    """Validate a parsed YAML mapping (also used to reload the resolved spec of a study)."""
    check = _Checker(where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)})")
    check.keys("", raw, SECTIONS)
    if "task" not in raw:
        raise ConfigError(f"{where}: field task: missing; give at least task: {{name: copying}}")
    if smoke and raw.get("smoke") in (None, {}):
        # Running the full study labelled "(smoke)" would be a silent, costly surprise.
        what = "no smoke section" if raw.get("smoke") is None else "an empty smoke section"
        raise ConfigError(f"{where}: --smoke asks for the smoke variant, but the file has {what}")
    overrides = raw.get("smoke") or {}
    check.mapping("smoke", overrides)
    check.keys("smoke", overrides, [s for s in SECTIONS if s != "smoke"])
    full = {k: v for k, v in raw.items() if k != "smoke"}
    # Both variants are built on every load, so a broken smoke section fails the full study's
    # validation too (CI only runs the smoke variant).
    full_spec = _build(full, name, where, smoke=False)
    try:
        smoke_spec = _build(_merge(full, overrides, check), name, where, smoke=True)
    except ConfigError as error:
        # Name the variant: the bad value may come from the smoke section or meet it there.
        message = str(error).replace(f"{where}: ", f"{where}: smoke variant: ", 1)
        raise ConfigError(message) from None
    return smoke_spec if smoke else full_spec


def _merge(base: dict[str, Any], overrides: dict[str, Any], check: _Checker) -> dict[str, Any]:
    """Section-wise merge: mapping sections update key by key, `target` is replaced."""
    merged = copy.deepcopy(base)
    for section, value in overrides.items():
        if section == "target":
            merged["target"] = value
            continue
        check.mapping(f"smoke.{section}", value)
        merged[section] = {**(merged.get(section) or {}), **copy.deepcopy(value or {})}
    return merged


def _build(raw: dict[str, Any], name: str, where: str, smoke: bool) -> StudySpec:
    from study.tasks import TASKS

    check = _Checker(where)
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
        seed=check.integer("search.seed", search_raw.get("seed", 0)),
        metric=check.choice("search.metric", search_raw.get("metric", "val/accuracy"), METRICS),
        mode=check.choice("search.mode", search_raw.get("mode", "max"), ("max", "min")),
    )
    _check_search(check, search, sections)

    resources_raw = raw.get("resources") or {}
    check.mapping("resources", resources_raw)
    check.keys("resources", resources_raw, [f.name for f in dataclasses.fields(Resources)])
    max_concurrent = resources_raw.get("max_concurrent")
    resources = Resources(
        cpus=check.number("resources.cpus", resources_raw.get("cpus", 1), positive=True),
        gpus=_gpus(check, resources_raw.get("gpus", 0)),
        max_concurrent=None
        if max_concurrent is None
        else check.integer("resources.max_concurrent", max_concurrent, minimum=1),
        max_failures=check.integer(
            "resources.max_failures",
            resources_raw.get("max_failures", DEFAULT_MAX_FAILURES),
            minimum=0,
        ),
        pack=check.integer("resources.pack", resources_raw.get("pack", 1), minimum=1),
    )
    if resources.pack > 1 and search.searcher == "optuna":
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
    )
    _probe_values(spec, check)
    return spec


def _check_search(check: _Checker, search: Search, sections: dict[str, dict[str, Any]]) -> None:
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


def _probe_values(spec: StudySpec, check: _Checker) -> None:
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
    return TrialConfig.from_dict(values, where=spec.source)


class _Checker:
    """Casts YAML's loose scalars and raises 'FILE: field X: what is allowed' errors."""

    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: field {field}: {message}")

    def mapping(self, field: str, value: Any) -> None:
        if value is not None and not isinstance(value, dict):
            raise self.error(field, f"must be a mapping of keys to values, got {value!r}")

    def keys(self, section: str, values: dict[str, Any], allowed: Any) -> None:
        allowed = list(dict.fromkeys(allowed))
        for key in values:
            if key not in allowed:
                field = f"{section}.{key}" if section else str(key)
                raise self.error(field, f"unknown key; allowed: {', '.join(map(str, allowed))}")

    def choice(self, field: str, value: Any, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.error(field, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def number(self, field: str, value: Any, positive: bool = False) -> float:
        if isinstance(value, bool):
            raise self.error(field, _bool_hint(value))
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self.error(field, f"must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0 or (positive and number == 0):
            bound = f"{'>' if positive else '>='} 0"
            raise self.error(field, f"must be a finite number {bound}, got {value}")
        return number

    def integer(self, field: str, value: Any, minimum: int | None = None) -> int:
        if isinstance(value, bool):
            raise self.error(field, _bool_hint(value))
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self.error(field, f"must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise self.error(field, f"must be an integer, got {value!r}")
        if minimum is not None and number < minimum:
            raise self.error(field, f"must be >= {minimum}, got {int(number)}")
        return int(number)

    def seeds(self, value: Any) -> tuple[int, ...]:
        field = "replicates.seeds"
        if isinstance(value, list):
            if not value:
                raise self.error(field, "must be a count or a non-empty list of integers")
            seeds = tuple(self.integer(field, v) for v in value)
            if len(set(seeds)) != len(seeds):
                raise self.error(field, f"lists a seed twice: {list(seeds)}")
            return seeds
        return tuple(range(self.integer(field, value, minimum=1)))

    def value(self, field: str, param: str, value: Any, range_end: bool = False) -> Any:
        """Cast one value of a TrialConfig parameter (task options are checked by the task)."""
        if value is None:
            if param in NULLABLE_FIELDS:
                return None
            raise self.error(field, "null is only allowed for clip_norm and anneal_last")
        if isinstance(value, bool) and param in (*FLOAT_FIELDS, *INT_FIELDS):
            raise self.error(field, _bool_hint(value, param))
        # `none` or `off` typed as a string: say how to write "off" (the design's null).
        nullable = param in NULLABLE_FIELDS and not range_end
        off = f", or null for {NULL_MEANS.get(param, 'off')}" if nullable else ""
        if param in FLOAT_FIELDS:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise self.error(field, f"must be a number{off}, got {value!r}") from None
        if param in INT_FIELDS:
            try:
                return self.integer(field, value)
            except ConfigError:
                if not off:
                    raise
                raise self.error(field, f"must be an integer{off}, got {value!r}") from None
        if param in PARAMS and not isinstance(value, str):
            raise self.error(field, f"must be a string, got {value!r}")
        return value

    def axis(self, section: str, param: str, value: Any, option_names: tuple[str, ...]) -> Axis:
        field = f"{section}.{param}"
        if isinstance(value, dict):
            if section == "fixed":
                raise self.error(field, "fixed values are scalars; ranges belong under nuisance")
            return self.range(field, param, value)
        if isinstance(value, list):
            if section == "fixed":
                raise self.error(
                    field, "a list is a grid axis; put it under scientific or nuisance"
                )
            if not value:
                raise self.error(field, "an axis needs at least one value")
            cast = [self.value(field, param, v) for v in value]
            if len({json.dumps(v, default=str) for v in cast}) != len(cast):
                raise self.error(field, f"lists a value twice: {value}")
            return cast
        return self.value(field, param, value)

    def range(self, field: str, param: str, value: dict[str, Any]) -> Range:
        self.keys(field, value, ["min", "max", "scaling"])
        if param not in FLOAT_FIELDS and param not in INT_FIELDS:
            raise self.error(field, "only numeric parameters can be sampled from {min, max}")
        for key in ("min", "max"):
            if key not in value:
                raise self.error(f"{field}.{key}", "missing; a range is {min, max, scaling}")
        low = self.value(f"{field}.min", param, value["min"], range_end=True)
        high = self.value(f"{field}.max", param, value["max"], range_end=True)
        if low is None or high is None:
            raise self.error(field, "range ends must be numbers, not null")
        scaling = self.choice(f"{field}.scaling", value.get("scaling", "linear"), SCALINGS)
        if not low < high:
            raise self.error(field, f"min must be < max, got min {low}, max {high}")
        if scaling == "log" and low <= 0:
            raise self.error(field, f"a log range needs min > 0, got {low}")
        return Range(float(low), float(high), scaling)


def _bool_hint(value: bool, param: str = "") -> str:
    word = "on/yes/true" if value else "off/no/false"
    hint = "; write null for no clipping" if param == "clip_norm" else ""
    return f"got {value} (YAML reads {word} as a boolean), expected a number{hint}"
