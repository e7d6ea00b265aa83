"""A random search's nuisance points: seeded draws, shared by every cell, each unlike the
earlier ones (study.space plans the trials from them)."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

from study.config import INT_FIELDS
from study.errors import ConfigError
from study.spec_checks import Range

if TYPE_CHECKING:
    from study.spec import StudySpec

# Draws of a random search's point before it gives up finding one unlike the earlier points.
MAX_REDRAWS = 1000


def random_draws(spec: StudySpec) -> list[dict[str, Any]]:
    """samples_per_cell nuisance points, shared by every cell: each method and seed is tried at
    the same nuisance settings, so cells differ only in what the study compares."""
    wanted = spec.search.samples_per_cell
    sizes = [_distinct_values(param, axis) for param, axis in spec.nuisance.items()]
    if all(size is not None for size in sizes):
        distinct = math.prod(size for size in sizes if size is not None)
        if wanted > distinct:
            raise ConfigError(
                f"{spec.source}: field search.samples_per_cell: {wanted} draws, but the nuisance "
                f"axes hold {distinct} distinct points: ask for at most {distinct}, use the grid "
                "searcher, or give a range"
            )
    draws: list[dict[str, Any]] = []
    for k in range(wanted):
        # A draw equal to an earlier one is drawn again (the planned trial would be dropped as a
        # duplicate, and the cell get fewer samples than asked, unsaid); the first attempt's
        # seed is the one every draw always had.
        for attempt in range(MAX_REDRAWS):
            rng = random.Random(f"{spec.search.seed}:{k}" + (f":{attempt}" if attempt else ""))
            draw = {p: _draw(rng, p, axis) for p, axis in spec.nuisance.items()}
            if draw not in draws:
                break
        else:  # a few distinct points left among many: the grid searcher lists them all
            raise ConfigError(
                f"{spec.source}: field search.samples_per_cell: no new point in {MAX_REDRAWS} "
                f"draws after {k}: ask for fewer, or use the grid searcher"
            )
        draws.append(draw)
    return draws


def _distinct_values(param: str, axis: Any) -> int | None:
    """How many values an axis can draw (None: unbounded, a float range): a list's, an integer
    range's whole numbers (draws are rounded), one for a fixed value."""
    if isinstance(axis, list):
        return len(axis)
    if not isinstance(axis, Range):
        return 1
    if param in INT_FIELDS:
        return round(axis.max) - round(axis.min) + 1
    return None


def _draw(rng: random.Random, param: str, axis: Any) -> Any:
    if isinstance(axis, list):
        return rng.choice(axis)
    if not isinstance(axis, Range):
        return axis
    if axis.scaling == "log":
        value = math.exp(rng.uniform(math.log(axis.min), math.log(axis.max)))
    else:
        value = rng.uniform(axis.min, axis.max)
    return round(value) if param in INT_FIELDS else value
