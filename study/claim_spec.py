"""The `claims:` section of a paper search space: each claim of the paper as data (its sentence,
where it applies, the methods it compares, the statistic it rests on, the expected direction),
checked with one-line errors. `study/analysis/claims.py` turns them into verdicts."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from study.errors import ConfigError
from study.methods import METHODS
from study.spec_checks import Checker

# Each statistic, what one run contributes, and the value meaning "no difference" for a claim
# without a baseline (a one-sample claim names its own value, `against`). Means are taken per cell
# (lr x clip x other settings) and then averaged over cells, so every cell weighs alike.
STATISTICS = {
    "success_rate": "share of runs reaching the study's target val accuracy",
    "divergence_rate": "share of runs whose loss became non-finite",
    "best_accuracy": "best val accuracy of a run",
    "final_accuracy": "val accuracy at a run's last evaluation",
    "convergence_auc": "area under a run's val-accuracy curve / budget (higher: faster)",
    "test_at_best": "test accuracy at a run's best val point (MNIST tasks)",
    "p_better": "P(method's best val accuracy > baseline's), runs paired by lr, clip and seed",
    "worst_lr_accuracy": "mean best val accuracy at the method's worst learning rate",
    "seed_spread": "standard deviation over seeds of best val accuracy, mean over cells",
}
# Statistics whose per-run value is 0 or 1: where every run agrees, their interval comes from
# Wilson (one sample) or Newcombe (a difference) instead of a resampling with no spread.
BINARY_STATISTICS = ("success_rate", "divergence_rate")
# Statistics with a baseline compare against "no difference"; p_better's no-difference is 1/2.
NO_DIFFERENCE = {"p_better": 0.5}
EXPECTATIONS = ("higher", "lower")
CLAIM_KEYS = (
    "id",
    "figure",
    "claim",
    "where",
    "method",
    "baseline",
    "statistic",
    "expect",
    "against",
    "published",
)
ID_PATTERN = re.compile(r"fig[0-9]+-[a-z0-9-]+")


@dataclass(frozen=True)
class Claim:
    """One claim of the paper, as a test the report can run on a study's trials."""

    id: str
    figure: int
    claim: str  # the paper's sentence (or its gist, where the figure states it)
    method: str  # the method the claim is about
    statistic: str
    expect: str  # higher | lower: the direction the paper claims, against `null`
    where: dict[str, Any] = field(default_factory=dict)  # param -> value the claim applies at
    baseline: str | None = None  # the method compared against; None: a one-sample claim
    null: float = 0.0  # the statistic's value meaning "no difference"
    published: str = ""  # the paper's (or a reproduction's) number, for the scorecard

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "figure": self.figure,
            "claim": self.claim,
            "where": dict(self.where),
            "method": self.method,
            "baseline": self.baseline,
            "statistic": self.statistic,
            "expect": self.expect,
            "null": self.null,
            "published": self.published,
        }


def parse_claims(raw: Any, check: Checker, params: tuple[str, ...]) -> tuple[Claim, ...]:
    """The claims of a `claims:` section; `params` are the names `where:` may use. A `where:`
    value is cast as the space's own values are (`1e-3`, which YAML reads as text, is the
    number 0.001), or no run could ever match it."""
    where = check.where
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: field claims: must be a non-empty list of claims")
    claims = []
    for index, item in enumerate(raw):
        claim = _claim(item, f"{where}: field claims[{index}]", params)
        scope = {
            key: check.value(f"claims[{index}].where.{key}", key, value)
            for key, value in claim.where.items()
        }
        claims.append(dataclasses.replace(claim, where=scope))
    ids = [claim.id for claim in claims]
    for claim_id in ids:
        if ids.count(claim_id) > 1:
            raise ConfigError(f"{where}: field claims: id {claim_id!r} is given twice")
    return tuple(claims)


def _claim(item: Any, field_name: str, params: tuple[str, ...]) -> Claim:
    if not isinstance(item, dict):
        raise ConfigError(f"{field_name}: must be a mapping with keys {', '.join(CLAIM_KEYS)}")
    for key in item:
        if key not in CLAIM_KEYS:
            raise ConfigError(f"{field_name}.{key}: unknown key; allowed: {', '.join(CLAIM_KEYS)}")
    for key in ("id", "figure", "claim", "method", "statistic", "expect"):
        if key not in item:
            raise ConfigError(f"{field_name}.{key}: missing")
    claim_id = item["id"]
    if not isinstance(claim_id, str) or not ID_PATTERN.fullmatch(claim_id):
        raise ConfigError(
            f"{field_name}.id: must look like fig4-no-clip (figN-, then a-z, 0-9, -), "
            f"got {claim_id!r}"
        )
    figure = item["figure"]
    if isinstance(figure, bool) or not isinstance(figure, int) or not 1 <= figure <= 99:
        raise ConfigError(
            f"{field_name}.figure: must be the paper's figure number, got {figure!r}"
        )
    sentence = item["claim"]
    if not isinstance(sentence, str) or not sentence.strip():
        raise ConfigError(f"{field_name}.claim: must be the paper's sentence, as text")
    for key in ("method", "baseline"):
        value = item.get(key)
        if key == "baseline" and value is None:
            continue
        if not isinstance(value, str) or value not in METHODS:
            raise ConfigError(
                f"{field_name}.{key}: unknown method {value!r}; allowed: {', '.join(METHODS)}"
            )
    statistic = item["statistic"]
    if not isinstance(statistic, str) or statistic not in STATISTICS:
        raise ConfigError(
            f"{field_name}.statistic: unknown statistic {statistic!r}; "
            f"allowed: {', '.join(STATISTICS)}"
        )
    baseline = item.get("baseline")
    if statistic == "p_better" and baseline is None:
        raise ConfigError(f"{field_name}.baseline: p_better compares two methods; name one")
    if baseline is not None and baseline == item["method"]:
        raise ConfigError(f"{field_name}.baseline: must differ from method {baseline!r}")
    expect = item["expect"]
    if not isinstance(expect, str) or expect not in EXPECTATIONS:
        raise ConfigError(
            f"{field_name}.expect: must be one of {', '.join(EXPECTATIONS)}, got {expect!r}"
        )
    null = _null(item, field_name, statistic, baseline)
    scope = item.get("where") or {}
    if not isinstance(scope, dict):
        raise ConfigError(f"{field_name}.where: must be a mapping of param to value")
    for key, value in scope.items():
        if key not in params:
            raise ConfigError(
                f"{field_name}.where.{key}: not a parameter of this study; allowed: "
                f"{', '.join(params)}"
            )
        if isinstance(value, list | dict):
            raise ConfigError(f"{field_name}.where.{key}: must be one value, got {value!r}")
    published = item.get("published", "")
    if not isinstance(published, str):
        raise ConfigError(f"{field_name}.published: must be text")
    return Claim(
        id=claim_id,
        figure=figure,
        claim=sentence.strip(),
        method=item["method"],
        statistic=statistic,
        expect=expect,
        where=dict(scope),
        baseline=baseline,
        null=null,
        published=published,
    )


def _null(item: dict[str, Any], field_name: str, statistic: str, baseline: str | None) -> float:
    """The no-difference value: 0 (or 1/2 for p_better) for a comparison; a one-sample claim
    ("most vanilla seeds succeed") must say what it is measured against."""
    if baseline is not None:
        if "against" in item:
            raise ConfigError(
                f"{field_name}.against: a claim with a baseline is tested against no "
                "difference; drop against"
            )
        return NO_DIFFERENCE.get(statistic, 0.0)
    if "against" not in item:
        raise ConfigError(
            f"{field_name}.against: missing; a claim without a baseline needs the value it is "
            "measured against (e.g. against: 0.5 for 'most seeds')"
        )
    value = item["against"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{field_name}.against: must be a number, got {value!r}")
    return float(value)


def same_value(value: Any, wanted: Any) -> bool:
    """Whether a run's parameter value is a claim's `where` value: numbers alike to 1e-9,
    null alike only to null (or the text none/null), anything else by its text."""
    if value is None or wanted is None:
        other = wanted if value is None else value
        return other is None or str(other).lower() in ("none", "null")
    if isinstance(value, int | float) and isinstance(wanted, int | float):
        return math.isclose(float(value), float(wanted), rel_tol=1e-9)
    return str(value) == str(wanted)
