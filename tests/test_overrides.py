"""`--set KEY=VALUE` overrides: parsed, applied, validated like the file (overrides, spec)."""

from __future__ import annotations

import pytest

from study.errors import ConfigError
from study.overrides import apply_overrides, overrides_text, parse_overrides
from study.space import make_plan
from study.spec import load_spec

QUICK = "search_spaces/quick.yaml"


def test_pairs_are_yaml_typed_and_applied_in_order():
    pairs = parse_overrides(["fixed.iterations=20000", "fixed.clip_norm=null", "a.b=[1, 2]"])
    assert pairs == (("fixed.iterations", 20000), ("fixed.clip_norm", None), ("a.b", [1, 2]))
    raw = apply_overrides({"fixed": {"iterations": 5}}, pairs, "f.yaml")
    assert raw == {"fixed": {"iterations": 20000, "clip_norm": None}, "a": {"b": [1, 2]}}
    assert overrides_text(pairs) == "fixed.iterations=20000 fixed.clip_norm=null a.b=[1, 2]"


def test_a_space_with_overrides_is_another_study_unless_named():
    spec = load_spec(QUICK, overrides=["fixed.iterations=500", "replicates.seeds=5"])
    assert spec.fixed["iterations"] == 500 and spec.seeds == (0, 1, 2, 3, 4)
    assert spec.name.startswith("quick-set-") and spec.name != "quick"
    assert spec.base_iterations == 3000  # the file's budget: the report's budget fraction
    assert spec.overrides == (("fixed.iterations", 500), ("replicates.seeds", 5))
    assert load_spec(QUICK, overrides=["fixed.iterations=500"], name="mine").name == "mine"
    assert load_spec(QUICK).name == "quick" and load_spec(QUICK).overrides == ()


def test_overrides_apply_to_the_smoke_variant_too():
    spec = load_spec(QUICK, smoke=True, overrides=["fixed.iterations=60"])
    assert spec.smoke and spec.fixed["iterations"] == 60 and spec.fixed["eval_every"] == 20


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("fixed.iterations=abc", "--set fixed.iterations=abc: field fixed.iterations: must be"),
        ("nosuch.x=1", "with --set nosuch.x=1: field nosuch: unknown key"),
        ("fixed.colour=red", "with --set fixed.colour=red: field fixed.colour: unknown key"),
        ("fixed.iterations.x=1", "fixed.iterations is a value, not a section"),
        ("fixed", "--set fixed: expected KEY=VALUE"),
        ("=3", "--set =3: expected KEY=VALUE"),
        ("fixed..lr=3", "--set fixed..lr=3: expected KEY=VALUE"),
        ("fixed.lr=[1", "--set fixed.lr=[1: the value is not valid YAML"),
        ("smoke.fixed.iterations=3", "--set smoke.fixed.iterations=3: set the value itself"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(pair, message):
    with pytest.raises(ConfigError) as error:
        load_spec(QUICK, overrides=[pair])
    assert message in str(error.value) and "\n" not in str(error.value), error.value


def test_overrides_are_checked_together_whatever_their_order():
    # Alone, fixed.iterations=40 is below the space's eval_every: the --set after it fixes that.
    for pairs in (
        ["fixed.iterations=40", "fixed.eval_every=20"],
        ["fixed.eval_every=20", "fixed.iterations=40"],
    ):
        spec = load_spec(QUICK, overrides=pairs)
        assert (spec.fixed["iterations"], spec.fixed["eval_every"]) == (40, 20), pairs


def test_an_error_names_the_set_that_brings_it_or_else_every_set():
    with pytest.raises(ConfigError) as one:
        load_spec(QUICK, overrides=["fixed.lr=0.01", "fixed.colour=red"])
    assert f"{QUICK} with --set fixed.colour=red: field fixed.colour: unknown key" in str(
        one.value
    )
    with pytest.raises(ConfigError) as together:  # neither --set is wrong alone
        load_spec(QUICK, overrides=["fixed.iterations=40", "fixed.eval_every=50"])
    assert str(together.value).startswith(
        f"{QUICK} with --set fixed.iterations=40 --set fixed.eval_every=50: field fixed.eval_every"
    ), together.value


def test_a_set_into_another_role_moves_the_parameter_there():
    """A space gives each parameter one role; --set names the role it should now have."""
    grid = load_spec(QUICK, overrides=["scientific.lr=[0.01, 0.001]"])
    assert grid.scientific["lr"] == [0.01, 0.001] and "lr" not in grid.fixed
    task_axis = load_spec(QUICK, overrides=["scientific.T=[5, 10]"])
    assert task_axis.scientific["T"] == [5, 10] and "T" not in task_axis.task_options
    back = load_spec(QUICK, overrides=["scientific.lr=[0.01, 0.001]", "fixed.lr=0.003"])
    assert back.fixed["lr"] == 0.003 and "lr" not in back.scientific
    ranged = load_spec(QUICK, overrides=["search.searcher=random", "nuisance.lr.min=0.001",
                                         "nuisance.lr.max=0.01"])  # fmt: skip
    assert "lr" not in ranged.fixed and ranged.nuisance["lr"].max == 0.01
    # Vanilla alone of a space with p_detach: p is 0 under none, as the user means it.
    assert make_plan(load_spec(QUICK, overrides=["scientific.method=[none]"])).n_trials == 3
    raw = apply_overrides({"task": {"name": "copying", "T": 10}}, [("fixed.name", 1)], "f")
    assert raw["task"]["name"] == "copying"  # the task's name is no parameter


@pytest.mark.parametrize(
    "value",
    [5e-05, 1e20, -2.5e-300, 0.001, 3.0, float("inf"), -float("inf"), 7, True, None, "red",
     "1", "true", "a, b", "", [0.001, 5e-05], [1e-05, "x y", None], {"a": 1e-07}],
)  # fmt: skip
def test_an_override_as_printed_reads_back_as_the_same_value(value):
    """`study plan --commands` prints the jobs' --set from these texts: a value read back
    otherwise (JSON's 5e-05 is text to YAML) would hash to another study."""
    printed = overrides_text([("fixed.lr", value)])
    assert parse_overrides([printed]) == (("fixed.lr", value),), printed


def test_the_plans_commands_make_the_plans_study():
    spec = load_spec(QUICK, overrides=["fixed.lr=0.00005"])
    again = load_spec(QUICK, overrides=[overrides_text(spec.overrides)])
    assert again.name == spec.name and again.spec_hash() == spec.spec_hash()
