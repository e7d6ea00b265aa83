"""Casting and checking of search-space values: the `_Checker` behind spec.py's one-line
'FILE: field X: what is allowed' errors, and a YAML loader that refuses duplicate keys."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml

from study.config import FLOAT_FIELDS, INT_FIELDS, NULLABLE_FIELDS, TrialConfig
from study.errors import ConfigError

SCALINGS = ("log", "linear")
# Trial fields a search space may set; task/task_options come from `task:`, seed from replicates.
PARAMS = tuple(
    f.name
    for f in dataclasses.fields(TrialConfig)
    if f.name not in ("task", "task_options", "seed")
)
# What null means for each of config.NULLABLE_FIELDS, for error hints.
NULL_MEANS = {
    "clip_norm": "no clipping",
    "anneal_last": "no annealing",
    "anneal_fraction": "no annealing",
}

# A study's name is a folder's (ray/NAME, reports/NAME, results/NAME): 255 bytes at most on
# common file systems, less room kept for what is added to it (NAME-set-HASH).
MAX_NAME_BYTES = 200


def name_problem(name: str) -> str | None:
    """What is wrong with a study name (None: nothing), from --name or a result file alike."""
    if not name.strip():
        # An empty name would head the plan ": 6 trials" and make result files that no later
        # command reads back.
        return "expected a study name, got an empty one"
    if "/" in name or "\0" in name or name.strip() in (".", ".."):  # ray/.. is the folder
        return f"expected a study name, got the path {name!r}"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"a study name is at most {MAX_NAME_BYTES} bytes (a folder is named after it)"
    return None


# A YAML or --set integer beyond a double (over 308 digits): float() raises, not inf.
TOO_LARGE = "must be a finite number, got an integer too large for a float"


@dataclass(frozen=True)
class Range:
    """A sampled axis `{min, max, scaling}`: drawn by the random or Optuna searcher."""

    min: float
    max: float
    scaling: str = "linear"


# An axis value: a list (grid axis), a Range, or one scalar (a single fixed value).
Axis = Any


class UniqueKeyLoader(yaml.SafeLoader):
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


# replicates.seeds as a count: more than resources.max_trials allows by default (100,000) is
# refused there; this bound only keeps the tuple of seeds from filling memory first.
MAX_SEED_COUNT = 10_000_000
# search.seed: Optuna's samplers take a seed in [0, 2^32); each cell's sampler gets this seed
# plus the cell's index, wrapped (runner/tuner.py).
MAX_SEARCH_SEED = 2**32 - 1


class Checker:
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

    def number(
        self, field: str, value: Any, positive: bool = False, maximum: float | None = None
    ) -> float:
        if isinstance(value, bool):
            raise self.error(field, _bool_hint(value))
        try:
            number = float(value)
        except OverflowError:  # an integer of over 308 digits: YAML reads it exactly
            raise self.error(field, TOO_LARGE) from None
        except (TypeError, ValueError):
            raise self.error(field, f"must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0 or (positive and number == 0):
            bound = f"{'>' if positive else '>='} 0"
            raise self.error(field, f"must be a finite number {bound}, got {value}")
        if maximum is not None and number > maximum:
            raise self.error(field, f"must be at most {maximum:g}, got {value}")
        return number

    def integer(
        self, field: str, value: Any, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        if isinstance(value, bool):
            raise self.error(field, _bool_hint(value))
        if isinstance(value, int):
            number = value  # exact: a float holds integers only up to 2^53
        else:
            try:
                as_float = float(value)
            except (TypeError, ValueError):
                raise self.error(field, f"must be an integer, got {value!r}") from None
            if not as_float.is_integer():
                raise self.error(field, f"must be an integer, got {value!r}")
            number = int(as_float)
        if minimum is not None and number < minimum:
            raise self.error(field, f"must be >= {minimum}, got {number}")
        if maximum is not None and number > maximum:
            raise self.error(field, f"must be <= {maximum:,}, got {number:,}")
        return number

    def seeds(self, value: Any) -> tuple[int, ...]:
        field = "replicates.seeds"
        if isinstance(value, list):
            if not value:
                raise self.error(field, "must be a count or a non-empty list of integers")
            seeds = tuple(self.integer(field, v) for v in value)
            if len(set(seeds)) != len(seeds):
                raise self.error(field, f"lists a seed twice: {list(seeds)}")
            return seeds
        # A count beyond any grid's trial limit would only fill memory before that check.
        return tuple(range(self.integer(field, value, minimum=1, maximum=MAX_SEED_COUNT)))

    def value(self, field: str, param: str, value: Any, range_end: bool = False) -> Any:
        """Cast one value of a TrialConfig parameter (task options are checked by the task)."""
        if value is None:
            if param in NULLABLE_FIELDS:
                return None
            raise self.error(field, f"null is only allowed for {', '.join(NULLABLE_FIELDS)}")
        if isinstance(value, bool) and param in (*FLOAT_FIELDS, *INT_FIELDS):
            raise self.error(field, _bool_hint(value, param))
        # `none` or `off` typed as a string: say how to write "off" (the design's null).
        nullable = param in NULLABLE_FIELDS and not range_end
        off = f", or null for {NULL_MEANS.get(param, 'off')}" if nullable else ""
        if param in FLOAT_FIELDS:
            try:
                return float(value)
            except OverflowError:
                raise self.error(field, TOO_LARGE) from None
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
