"""The claims: section of a search space: parsed into Claims, bad entries one line (claim_spec)."""

from __future__ import annotations

import pytest

from study.claim_spec import Claim, parse_claims
from study.errors import ConfigError

PARAMS = ("lr", "clip_norm", "p_detach", "T")
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
    (claim,) = parse_claims([GOOD], "f.yaml", PARAMS)
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
    (p_better,) = parse_claims([{**GOOD, "statistic": "p_better"}], "f.yaml", PARAMS)
    assert p_better.null == 0.5
    assert parse_claims(None, "f.yaml", PARAMS) == ()


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
    ],
)
def test_a_bad_claim_is_one_line_naming_its_field(change, message):
    item = {k: v for k, v in {**GOOD, **change}.items() if v is not None or k == "where"}
    if change.get("baseline", 1) is None:
        item.pop("baseline", None)
    with pytest.raises(ConfigError) as error:
        parse_claims([item], "f.yaml", PARAMS)
    assert str(error.value).startswith(f"f.yaml: {message}"), error.value
    assert "\n" not in str(error.value)


def test_ids_are_unique_and_the_section_is_a_list():
    with pytest.raises(ConfigError, match="id 'fig4-no-clip' is given twice"):
        parse_claims([GOOD, GOOD], "f.yaml", PARAMS)
    with pytest.raises(ConfigError, match="field claims: must be a non-empty list"):
        parse_claims({"id": "x"}, "f.yaml", PARAMS)
