"""The claims: section of a search space: parsed into Claims, bad entries one line (claim_spec)."""

from __future__ import annotations

import pytest

from study.claim_spec import Claim, parse_claims, same_value
from study.errors import ConfigError
from study.spec_checks import Checker

PARAMS = ("lr", "clip_norm", "p_detach", "T", "method")
CHECK = Checker("f.yaml")
GOOD = {
    "id": "fig4-no-clip",
    "figure": 4,
    "claim": "without clipping vanilla is unstable, h-detach is not",
    "method": "h_detach",
    "baseline": "none",
    "statistic": "divergence_rate",
    "expect": "lower",
    "where": {"clip_norm": None},
}


def test_a_claim_is_parsed_with_its_null():
    (claim,) = parse_claims([GOOD], CHECK, PARAMS)
    assert claim == Claim(
        id="fig4-no-clip",
        figure=4,
        claim=GOOD["claim"],
        method="h_detach",
        baseline="none",
        statistic="divergence_rate",
        expect="lower",
        where={"clip_norm": None},
        null=0.0,
    )
    (p_better,) = parse_claims([{**GOOD, "statistic": "p_better"}], CHECK, PARAMS)
    assert p_better.null == 0.5
    assert parse_claims(None, CHECK, PARAMS) == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": "Fig4"}, "field claims[0].id: must look like fig4-no-clip"),
        ({"figure": "four"}, "field claims[0].figure: must be the paper's figure number"),
        ({"method": "h-detach"}, "field claims[0].method: unknown method 'h-detach'"),
        ({"statistic": "accuracy"}, "field claims[0].statistic: unknown statistic 'accuracy'"),
        ({"expect": "better"}, "field claims[0].expect: must be one of higher, lower"),
        ({"where": {"depth": 3}}, "field claims[0].where.depth: not a parameter of this study"),
        ({"where": {"lr": [1, 2]}}, "field claims[0].where.lr: must be one value"),
        ({"baseline": None}, "field claims[0].against: missing"),
        ({"against": 0.5}, "field claims[0].against: a claim with a baseline"),
        ({"baseline": "h_detach"}, "field claims[0].baseline: must differ"),
        ({"colour": "red"}, "field claims[0].colour: unknown key"),
        # Lists where one name goes: one line, not a TypeError from a dictionary lookup.
        ({"method": ["h_detach"]}, "field claims[0].method: unknown method ['h_detach']"),
        ({"statistic": ["p_better"]}, "field claims[0].statistic: unknown statistic"),
        ({"expect": ["higher"]}, "field claims[0].expect: must be one of higher, lower"),
        ({"where": {"lr": "fast"}}, "field claims[0].where.lr: must be a number, got 'fast'"),
        ({"where": {"lr": None}}, "field claims[0].where.lr: null is only allowed for"),
    ],
)
def test_a_bad_claim_is_one_line_naming_its_field(change, message):
    item = {k: v for k, v in {**GOOD, **change}.items() if v is not None or k == "where"}
    if change.get("baseline", 1) is None:
        item.pop("baseline", None)
    with pytest.raises(ConfigError) as error:
        parse_claims([item], CHECK, PARAMS)
    assert str(error.value).startswith(f"f.yaml: {message}"), error.value
    assert "\n" not in str(error.value)


def test_ids_are_unique_and_the_section_is_a_list():
    with pytest.raises(ConfigError, match="id 'fig4-no-clip' is given twice"):
        parse_claims([GOOD, GOOD], CHECK, PARAMS)
    with pytest.raises(ConfigError, match="field claims: must be a non-empty list"):
        parse_claims({"id": "x"}, CHECK, PARAMS)


def test_where_values_are_cast_as_the_space_casts_them():
    # YAML reads 1e-3 (no dot) as the text '1e-3': uncast, no run's lr 0.001 would match it.
    where = {"lr": "1e-3", "clip_norm": 1, "T": 100, "method": "h_detach"}
    (claim,) = parse_claims([{**GOOD, "where": where}], CHECK, PARAMS)
    assert claim.where == {"lr": 0.001, "clip_norm": 1.0, "T": 100, "method": "h_detach"}
    assert type(claim.where["lr"]) is float


def test_same_value_tells_null_from_a_number():
    assert same_value(None, None) and same_value(None, "none") and same_value("null", None)
    # A run without clipping (clip_norm None) is not a claim's clip_norm 1.0, nor the reverse.
    assert not same_value(None, 1.0) and not same_value(1.0, None)
    assert same_value(0.001, 1e-3) and same_value(100, 100.0) and not same_value(0.25, 0.5)
    assert same_value("h_detach", "h_detach") and not same_value("none", "h_detach")
