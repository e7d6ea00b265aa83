"""Cost tables and study estimates (study/costs.py): loading and refusing tables, interpolation
in pack size, scaling in sequence length, a plan's estimate and its text, and the shipped H100
table against the run it was transcribed from."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, tiny_copying, write_space
from cost_fixtures import entry, small_plan, table_json, write_table

from study import cost_text, costs
from study.errors import ConfigError
from study.space import make_plan
from study.spec import load_spec

SHIPPED = REPO / "benchmarks" / "results"
FIG4 = REPO / "search_spaces" / "paper" / "fig4_pixel_mnist_no_clip.yaml"


@pytest.fixture
def table(tmp_path: Path) -> costs.CostTable:
    write_table(tmp_path, table_json())
    return costs.load_table("h200", tmp_path)


def test_import_is_light() -> None:
    """`study plan` imports it: no torch at import time."""
    code = "import sys, study.costs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_load_table_reads_fields_and_names_case_insensitively(tmp_path: Path) -> None:
    write_table(tmp_path, table_json())
    loaded = costs.load_table("H200", tmp_path)
    assert (loaded.gpu, loaded.device_name, loaded.commit) == ("h200", "Test GPU", "abc1234")
    assert [e.members for e in loaded.entries] == [1, 4, 8, 1]
    assert loaded.entries[0].eval_ms_per_pack_batch == 1.0


def test_missing_table_names_the_file_and_the_tables_there(tmp_path: Path) -> None:
    write_table(tmp_path, table_json("a100"), "a100")
    with pytest.raises(ConfigError, match=r"h200\.json: no cost table .*tables there: a100"):
        costs.load_table("h200", tmp_path)
    with pytest.raises(ConfigError, match="--gpu"):
        costs.load_table("../h100", tmp_path)


def _without(raw: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != key}


DAMAGED = {
    "not json": ("{", "not valid JSON"),
    "a list": ([], "expected a JSON object"),
    "no commit": (_without(table_json(), "commit"), "missing field.*commit"),
    "other gpu": (table_json("h100"), "gpu is 'h100'"),
    "no entries": (table_json(entries=[]), "non-empty list"),
    "entry field": (
        table_json(entries=[_without(entry(1, 2.0), "ms_per_pack_step")]),
        r"entries\[0\]: missing field.*ms_per_pack_step",
    ),
    "zero ms": (table_json(entries=[entry(1, 0.0)]), r"entries\[0\]\.ms_per_pack_step"),
    "text members": (
        table_json(entries=[{**entry(1, 2.0), "members": "1"}]),
        r"entries\[0\]\.members",
    ),
    "precision": (table_json(entries=[entry(1, 2.0, precision="fp16")]), "precision must be"),
    "start": (
        table_json(entries=[entry(1, 2.0, start_ms=-1.0)]),
        r"entries\[0\]\.start_ms must be a positive number, got -1\.0",
    ),
    "twice": (table_json(entries=[entry(1, 2.0), entry(1, 3.0)]), "two entries"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_table_is_a_one_line_error_naming_the_file(tmp_path: Path, case: str) -> None:
    raw, expected = DAMAGED[case]
    write_table(tmp_path, raw)
    with pytest.raises(ConfigError, match=expected) as error:
        costs.load_table("h200", tmp_path)
    assert str(error.value).startswith(str(tmp_path / "h200.json"))
    assert "\n" not in str(error.value)


def cost(table: costs.CostTable, steps: int = 25, members: int = 1, **kw: Any) -> float:
    shape = {"hidden": 8, "batch": 10, "precision": "tf32", **kw}
    return costs.step_ms(table, steps=steps, members=members, **shape)


def test_step_ms_exact_and_interpolated_in_members(table: costs.CostTable) -> None:
    assert cost(table, members=4) == 5.0
    assert cost(table, members=1, precision="fp32") == 3.0
    assert cost(table, members=2) == pytest.approx(3.0)  # 2 + (5 - 2) x 1/3
    assert cost(table, members=6) == pytest.approx(7.0)  # 5 + (9 - 5) x 2/4
    assert cost(table, members=6, precision="auto") == cost(table, members=6)  # auto is tf32
    between = costs.step_cost(table, steps=25, hidden=8, batch=10, members=6, precision="tf32")
    assert between.between_members == (4, 8) and between.scaled_from_steps is None
    assert between.eval_ms_per_pack_batch == pytest.approx(6.0)


def test_step_ms_refuses_outside_the_measured_members_and_shapes(table: costs.CostTable) -> None:
    with pytest.raises(ConfigError, match=r"pack of 9 .* outside the measured pack sizes 1\.\.8"):
        cost(table, members=9)
    with pytest.raises(ConfigError, match=r"pack of 2 .* fp32 .* sizes 1\.\.1"):
        cost(table, members=2, precision="fp32")
    with pytest.raises(ConfigError, match=r"no entry for H=16 B=10 tf32; measured: H=8 B=10"):
        cost(table, hidden=16)
    with pytest.raises(ConfigError, match="precision"):
        cost(table, precision="fp16")


def test_step_ms_scales_unmeasured_lengths_from_the_nearest(tmp_path: Path) -> None:
    long = [entry(1, 8.0, steps=100), entry(4, 20.0, steps=100)]
    write_table(tmp_path, table_json(entries=[entry(1, 2.0), entry(4, 5.0), *long]))
    table = costs.load_table("h200", tmp_path)
    assert cost(table, steps=50, members=1) == pytest.approx(4.0)  # 25 nearer: 2 x 50/25
    assert cost(table, steps=80, members=4) == pytest.approx(16.0)  # 100 nearer: 20 x 0.8
    assert cost(table, steps=100, members=4) == 20.0
    scaled = costs.step_cost(table, steps=10, hidden=8, batch=10, members=2, precision="tf32")
    assert scaled.ms_per_pack_step == pytest.approx(3.0 * 10 / 25)
    assert scaled.scaled_from_steps == 25 and scaled.cudnn_step_ms == pytest.approx(1.6)


def test_sequence_length_and_validation_size_come_from_options() -> None:
    assert costs.sequence_length("copying", {"T": 300}) == 320
    assert costs.sequence_length("copying", {}) == 120  # the task's default T = 100
    assert costs.sequence_length("pixel_mnist", {"dataset": "mnist"}) == 784
    assert costs.sequence_length("permuted_mnist", {}) == 784
    assert costs.sequence_length("no_such_task", {}) is None
    assert costs.validation_size("copying", {}) == 5000
    assert costs.validation_size("copying", {"val_size": 300}) == 300
    assert costs.validation_size("pixel_mnist", {}) == 10_000
    assert costs.validation_size("pixel_mnist", {"subset": 200}) == 200


def test_estimate_of_a_small_plan(tmp_path: Path) -> None:
    write_table(tmp_path, table_json())
    one_pack = costs.estimate(small_plan(tmp_path, 4), "h200", tmp_path)
    assert (one_pack.n_trials, one_pack.n_packs, one_pack.unestimated) == (4, 1, ())
    assert one_pack.train_s == pytest.approx(720_000 * 5.0 / 1000)  # 3600 s
    # 720 evaluations x 1 batch (100 sequences, 500 a batch) x 4 ms (a pack of 4).
    assert one_pack.packs[0].eval_s == pytest.approx(720 * 4.0 / 1000)
    assert one_pack.eval_included and one_pack.total_s == pytest.approx(3600 + 2.88)
    # Packs of 3 and 1: (2 + 3 x 2/3) and 2 ms per pack step.
    uneven = costs.estimate(small_plan(tmp_path, 3), "h200", tmp_path)
    assert [p.members for p in uneven.packs] == [3, 1]
    assert uneven.train_s == pytest.approx(720_000 * (4.0 + 2.0) / 1000)
    solo = costs.estimate(small_plan(tmp_path, 1), "h200", tmp_path)
    assert solo.n_packs == 4 and solo.train_s == pytest.approx(4 * 720_000 * 2.0 / 1000)


def test_a_pack_start_up_counts_once_per_pack(tmp_path: Path) -> None:
    measured = [entry(1, 2.0, start_ms=400.0), entry(4, 5.0, start_ms=1000.0)]
    write_table(tmp_path, table_json(entries=measured))
    one_pack = costs.estimate(small_plan(tmp_path, 4), "h200", tmp_path)
    assert one_pack.packs[0].start_s == pytest.approx(1.0) and one_pack.start_included
    assert one_pack.total_s == pytest.approx(3600 + 2.88 + 1.0)
    # Packs of 3 and 1: interpolated as the step is, 400 + 600 x 2/3 ms, and 400 ms.
    uneven = costs.estimate(small_plan(tmp_path, 3), "h200", tmp_path)
    assert [p.start_s for p in uneven.packs] == [pytest.approx(0.8), pytest.approx(0.4)]
    # Scaled in sequence length as the step is (the graph's warm-up steps are steps too).
    table = costs.load_table("h200", tmp_path)
    longer = costs.step_cost(table, steps=50, hidden=8, batch=10, members=4, precision="tf32")
    assert longer.start_ms == pytest.approx(2000.0)
    # One side of an interpolation unmeasured: not counted, and said (test_cost_text.py).
    write_table(tmp_path, table_json(entries=[entry(1, 2.0), measured[1]]))
    assert not costs.estimate(small_plan(tmp_path, 3), "h200", tmp_path).start_included


def test_several_studies_add_up(tmp_path: Path) -> None:
    write_table(tmp_path, table_json())
    four = costs.estimate(small_plan(tmp_path, 4), "h200", tmp_path)  # priced whole
    body = tiny_copying(
        fixed={"iterations": 600, "eval_every": 100, "device": "auto"}, resources={"pack": 9}
    )
    body["replicates"] = {"seeds": 5}  # a pack of 9 the table cannot price, and one of 1
    big = costs.estimate(
        make_plan(load_spec(write_space(tmp_path, "big", body))), "h200", tmp_path
    )
    both = costs.Studies((four, big))
    assert both.total_s == pytest.approx(four.total_s + big.total_s)
    assert (both.n_trials, both.estimated_trials, both.n_packs, both.estimated_packs) == (
        14,
        5,
        3,
        2,
    )
    assert not both.complete and both.eval_included
    assert costs.Studies((four,)).complete
    # Nothing priced: no evaluation counted either.
    assert not costs.Studies((dataclasses.replace(big, packs=()),)).eval_included


def test_estimate_lists_what_it_cannot_estimate(tmp_path: Path) -> None:
    write_table(tmp_path, table_json())
    body = tiny_copying(
        fixed={"iterations": 600, "eval_every": 100, "device": "auto"}, resources={"pack": 9}
    )
    body["replicates"] = {"seeds": 5}  # 10 trials: a pack of 9 (beyond the table) and one of 1
    plan = make_plan(load_spec(write_space(tmp_path, "big", body)))
    result = costs.estimate(plan, "h200", tmp_path)
    assert [p.members for p in result.packs] == [1]
    assert [(u.what, u.trials) for u in result.unestimated] == [("p0000", 9)]
    text = cost_text.estimate_text(plan, "h200", tmp_path)
    assert "for 1 of 10 trials in 1 of 2 packs" in text
    assert "not estimated: 9 trials (p0000): h200.json: a pack of 9" in text


def test_estimate_of_an_optuna_plan_says_it_has_no_packs(tmp_path: Path) -> None:
    write_table(tmp_path, table_json())
    body = tiny_copying(
        nuisance={"lr": {"min": 1.0e-4, "max": 1.0e-2, "scaling": "log"}},
        search={"searcher": "optuna", "samples_per_cell": 2},
    )
    plan = make_plan(load_spec(write_space(tmp_path, "tuned", body)))
    result = costs.estimate(plan, "h200", tmp_path)
    assert result.packs == () and result.n_packs == 0
    assert result.unestimated[0].trials == plan.n_trials == 8
    text = cost_text.estimate_text(plan, "h200", tmp_path)
    assert "estimate: none of the 8 trials could be estimated" in text
    assert "Optuna study suggests its trials one at a time and plans no packs" in text


def test_estimate_says_when_evaluation_is_not_in_the_table(tmp_path: Path) -> None:
    write_table(tmp_path, table_json(entries=[entry(4, 5.0, eval_ms_per_pack_batch=None)]))
    result = costs.estimate(small_plan(tmp_path, 4), "h200", tmp_path)
    assert not result.eval_included and result.total_s == result.train_s
    text = cost_text.estimate_text(small_plan(tmp_path, 4), "h200", tmp_path)
    assert "(training steps only)" in text
    assert "evaluation not included: the table has no eval_ms_per_pack_batch" in text


def h100_step_rows() -> dict[tuple[str, int, str], float]:
    """(shape, members, precision) -> ms per trial-step, read from the first block of
    benchmarks/results/h100.txt (the run the shipped table transcribes)."""
    first_block = (SHIPPED / "h100.txt").read_text().split("# An earlier run")[0]
    copying, pixel_mnist = first_block.split("pixel MNIST:")[:2]
    patterns = {
        1: r"STEP h-detach trial, precision (\w+) \[Triton split\]\s+([\d.]+)",
        16: r"STEP 16 packed h-detach trials, per trial, precision (\w+) \[[^\]]+\]\s+([\d.]+)",
    }
    found = {}
    for shape, block in (("copying", copying), ("pixel_mnist", pixel_mnist)):
        for members, pattern in patterns.items():
            for match in re.finditer(pattern, block):
                found[(shape, members, match.group(1))] = float(match.group(2))
    return found


def test_shipped_h100_table_transcribes_its_run() -> None:
    table = costs.load_table("h100")
    measured = h100_step_rows()
    assert len(measured) == len(table.entries) == 8
    for e in table.entries:
        assert e.ms_per_trial_step == measured[(e.shape, e.members, e.precision)]
        assert e.ms_per_pack_step == pytest.approx(e.members * e.ms_per_trial_step)
        assert e.eval_ms_per_pack_batch is None
    assert "h100.txt" in table.source and "pack_sweep.py" in table.source


def _fig4(pack: int, precision: str) -> Any:
    overrides = [f"resources.pack={pack}", f"fixed.precision={precision}"]
    return make_plan(load_spec(FIG4, overrides=overrides))


def test_fig4_estimate_on_h100_from_the_shipped_table() -> None:
    """Fig. 4: 10 trials x 100,000 iterations of pixel MNIST. In one pack of 10 (pack 16), tf32,
    the step lies between the measured 5.56 ms (1 trial) and 33.28 ms (16): 22.19 ms, 0.62 h."""
    table = costs.load_table("h100")
    ms = {(e.members, e.precision): e.ms_per_pack_step for e in table.entries if e.steps == 784}
    packed = costs.estimate(_fig4(16, "tf32"), "h100")
    assert packed.n_packs == 1 and packed.packs[0].members == 10
    per_step = ms[1, "tf32"] + (ms[16, "tf32"] - ms[1, "tf32"]) * 9 / 15
    assert packed.total_s == pytest.approx(100_000 * per_step / 1000)
    assert packed.total_s / 3600 == pytest.approx(0.616, abs=0.001)
    solo = costs.estimate(_fig4(1, "tf32"), "h100")
    assert solo.total_s / 3600 == pytest.approx(10 * 100_000 * 5.56 / 1000 / 3600)
    fp32 = costs.estimate(_fig4(16, "fp32"), "h100")
    assert fp32.total_s == pytest.approx(100_000 * (15.76 + (52.8 - 15.76) * 9 / 15) / 1000)
    text = cost_text.estimate_text(_fig4(16, "tf32"), "h100")
    assert "estimate: 37 min of GPU time (training steps only) for 10 of 10 trials" in text


def test_trials_pinned_to_the_cpu_are_not_priced_as_gpu_time(tmp_path: Path) -> None:
    write_table(tmp_path, table_json())
    body = tiny_copying(fixed={"iterations": 600, "eval_every": 100, "device": "cpu"})
    result = costs.estimate(make_plan(load_spec(write_space(tmp_path, "cpu", body))), "h200",
                            tmp_path)  # fmt: skip
    assert result.packs == () and result.unestimated[0].reason == (
        "device cpu: its trials train on a CPU, which no GPU table prices"
    )
