"""`--set KEY=VALUE` overrides of a search space: dotted keys into its sections, values typed as
YAML, applied in order; the resulting space is validated exactly like the file (spec.py)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import yaml

from study.errors import ConfigError
from study.spec_checks import UniqueKeyLoader

AXIS_SECTIONS = ("fixed", "scientific", "nuisance")  # a parameter's roles in a study
# Every section a parameter can live in. A space gives each parameter exactly one (spec.py), so a
# --set that puts a parameter in one takes it out of the others: `--set scientific.lr=[...]`
# turns a fixed lr into a grid, where refusing it ("already set in fixed") left no way to.
PARAM_SECTIONS = ("task", "model", *AXIS_SECTIONS)


def parse_overrides(texts: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """`--set KEY=VALUE` texts as (dotted key, YAML-typed value) pairs; one-line errors."""
    pairs = []
    for text in texts:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key or any(not part.strip() for part in key.split(".")):
            raise ConfigError(
                f"--set {text}: expected KEY=VALUE with a dotted key into the search space, "
                "e.g. --set fixed.iterations=20000"
            )
        if key.split(".")[0] == "smoke":
            raise ConfigError(
                f"--set {text}: set the value itself (e.g. fixed.iterations); --set applies to "
                "the variant being run, smoke included"
            )
        try:
            value = yaml.load(value_text, Loader=UniqueKeyLoader) if value_text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(
                f"--set {text}: the value is not valid YAML; allowed: a number, true/false, null, "
                "a list like [1, 2] or text"
            ) from None
        pairs.append((key, value))
    return tuple(pairs)


def overrides_hash(pairs: Sequence[tuple[str, Any]]) -> str:
    """Six hex digits naming a set of overrides (order kept: a later pair wins)."""
    text = json.dumps([list(pair) for pair in pairs], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def overrides_text(pairs: Sequence[tuple[str, Any]]) -> str:
    """The overrides as the user would type them: `fixed.iterations=20000 replicates.seeds=5`."""
    return " ".join(f"{key}={_text(value)}" for key, value in pairs)


def _text(value: Any, nested: bool = False) -> str:
    """A value as typed after --set, such that parse_overrides reads back the same value: the
    commands `study plan --commands` prints must make the plan's study (its name hashes the
    values). JSON would not do: its 5e-05 is text to YAML 1.1, which wants 5.0e-05."""
    if isinstance(value, str):
        return value if not nested and _reads_as(value, value) else json.dumps(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_text(item, nested=True) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_text(k, nested=True)}: {_text(v, nested=True)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return json.dumps(value, default=str)  # int, bool, null


def _float_text(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)  # round-trips; YAML 1.1 reads an exponent only after a decimal point
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _reads_as(text: str, value: Any) -> bool:
    try:
        return yaml.load(text, Loader=UniqueKeyLoader) == value if text.strip() else False
    except yaml.YAMLError:
        return False


def apply_overrides(
    raw: dict[str, Any], pairs: Sequence[tuple[str, Any]], where: str
) -> dict[str, Any]:
    """raw with each dotted key set (intermediate mappings created), a parameter moved out of
    the section it had (PARAM_SECTIONS); a key that runs into a value that is no mapping is one
    line naming it."""
    result = copy.deepcopy(raw)
    for key, value in pairs:
        node = result
        parts = key.split(".")
        # nuisance.lr.min moves lr too; task.name is no parameter.
        if len(parts) >= 2 and parts[0] in PARAM_SECTIONS and parts[1] != "name":
            for section in PARAM_SECTIONS:
                other = result.get(section)
                if section != parts[0] and isinstance(other, dict):
                    other.pop(parts[1], None)
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                inner = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"{where}: --set {key}: {inner} is a value, not a section ({child!r})"
                )
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return result


Built = TypeVar("Built")


def checked_together(
    build: Callable[[tuple[tuple[str, Any], ...], str], Built],
    overrides: tuple[tuple[str, Any], ...],
    where: str,
) -> Built:
    """build(every pair, label): the --set pairs applied and checked once, since a later --set
    may make an earlier one valid (fixed.iterations=40, then fixed.eval_every=20). An error
    names the --set that brings it alone, or else every --set."""
    every = f"{where} with " + " ".join(f"--set {overrides_text([pair])}" for pair in overrides)
    try:
        return build(overrides, every)
    except ConfigError as error:
        problem = str(error).removeprefix(f"{every}: ")
    for pair in overrides:
        one = f"{where} with --set {overrides_text([pair])}"
        try:
            build((pair,), one)
        except ConfigError as alone:
            if str(alone).removeprefix(f"{one}: ") == problem:
                raise ConfigError(str(alone)) from None
    raise ConfigError(f"{every}: {problem}") from None
