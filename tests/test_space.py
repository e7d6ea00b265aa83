"""Expanding a StudySpec into its one Plan: grid order and dedupe, random draws, packs, Optuna
cells, roles, counts, and the plan text."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, tiny_copying, write_space

from study import space
from study.errors import ConfigError
from study.pack_layout import KNOWN_GPUS
from study.spec import Range, load_spec

SEARCH_SPACES = sorted((REPO / "search_spaces").rglob("*.yaml"))


def test_grid_seeds_vary_fastest_and_method_none_collapses(tmp_path: Path) -> None:
    body = tiny_copying(
        scientific={"method": ["none", "h_detach"], "p_detach": [0.25, 0.5]},
        nuisance={"lr": [1.0e-3, 1.0e-2]},
    )
    spec = load_spec(write_space(tmp_path, "grid", body))
    trials = space.plan_trials(spec)
    # none x {0.25, 0.5} collapses to one p_detach=0 point: (1 + 2) methods x 2 lr x 2 seeds.
    assert len(trials) == 12 == space.make_plan(spec).n_trials
    assert [t.trial_id for t in trials] == [f"t{i:04d}" for i in range(12)]
    assert [t.config.seed for t in trials[:4]] == [0, 1, 0, 1]
    assert [t.config.lr for t in trials[:4]] == [1.0e-3, 1.0e-3, 1.0e-2, 1.0e-2]
    none = [t for t in trials if t.config.method == "none"]
    assert len(none) == 4 and {t.config.p_detach for t in none} == {0.0}
    assert {t.config.p_detach for t in trials if t.config.method == "h_detach"} == {0.25, 0.5}
    assert trials[0].point == {"method": "none", "p_detach": 0.0, "lr": 1.0e-3, "seed": 0}
    # Fixed values and task options reach every config.
    assert all(t.config.iterations == 20 and t.config.task_options["T"] == 5 for t in trials)
    assert all(t.config.hidden_size == 8 for t in trials)


def test_task_option_axis_goes_into_task_options(tmp_path: Path) -> None:
    body = tiny_copying(scientific={"T": [5, 7]}, replicates={"seeds": 1})
    body["task"] = {"name": "copying", "train_size": 500, "val_size": 100}
    body["scientific"] = {"T": [5, 7]}
    spec = load_spec(write_space(tmp_path, "t_axis", body))
    trials = space.plan_trials(spec)
    assert [t.config.task_options["T"] for t in trials] == [5, 7]
    assert trials[0].config.task_options["train_size"] == 500
    assert space.make_plan(spec).roles["task_options.T"] == "scientific"


def test_random_draws_are_seeded_in_range_and_shared_by_cells(tmp_path: Path) -> None:
    body = tiny_copying(
        nuisance={
            "lr": {"min": 1.0e-4, "max": 1.0e-2, "scaling": "log"},
            "batch_size": [10, 20],
            "anneal_last": {"min": 0, "max": 10},  # every integer field draws integers
            "eval_every": {"min": 5, "max": 10},
        },
        search={"searcher": "random", "samples_per_cell": 3, "seed": 11},
    )
    spec = load_spec(write_space(tmp_path, "random", body))
    trials = space.plan_trials(spec)
    assert len(trials) == 2 * 3 * 2  # methods x samples x seeds
    for trial in trials:
        assert 1.0e-4 <= trial.config.lr <= 1.0e-2
        assert trial.config.batch_size in (10, 20)
        assert type(trial.config.anneal_last) is int and 0 <= trial.config.anneal_last <= 10
        assert type(trial.config.eval_every) is int and 5 <= trial.config.eval_every <= 10
    by_method: dict[str, list[float]] = {}
    for trial in trials:
        by_method.setdefault(trial.config.method, []).append(trial.config.lr)
    assert by_method["none"] == by_method["h_detach"]  # same nuisance points for each method
    assert len(set(by_method["none"])) == 3
    again = space.plan_trials(load_spec(write_space(tmp_path, "random", body)))
    assert [t.config for t in again] == [t.config for t in trials]


def test_optuna_cells_number_trials_study_wide(tmp_path: Path) -> None:
    body = tiny_copying(
        scientific={"method": ["none", "h_detach"]},
        nuisance={"lr": {"min": 1.0e-3, "max": 1.0e-1, "scaling": "log"}, "p_detach": [0.25, 0.5]},
        search={"searcher": "optuna", "samples_per_cell": 3},
    )
    body["scientific"] = {"method": ["none", "h_detach"]}
    spec = load_spec(write_space(tmp_path, "optuna", body))
    plan = space.make_plan(spec)
    cells = plan.cells
    assert len(cells) == 4  # 2 methods x 2 seeds
    assert [c.first_trial for c in cells] == [0, 3, 6, 9]
    assert cells[1].trial_ids() == ["t0003", "t0004", "t0005"]
    assert "p_detach" not in cells[0].domains  # method none never detaches
    assert set(cells[2].domains) == {"lr", "p_detach"}
    assert plan.n_trials == 12 and plan.optuna
    assert plan.trials == plan.packs == ()  # an Optuna study is planned as cells only
    with pytest.raises(ValueError):
        space.plan_trials(spec)
    base = space.cell_config(spec, cells[2], {})
    sampled = space.sample_config(base.to_dict(), {"lr": 0.05, "p_detach": 0.5}, ["T"])
    assert (sampled.method, sampled.lr, sampled.p_detach, sampled.seed) == (
        "h_detach",
        0.05,
        0.5,
        0,
    )
    none = space.sample_config(space.cell_config(spec, cells[0], {}).to_dict(), {"lr": 0.01}, [])
    assert none.p_detach == 0.0


def test_roles_cover_every_flattened_param(tmp_path: Path) -> None:
    spec = load_spec(
        write_space(tmp_path, "roles", tiny_copying(nuisance={"batch_size": [10, 20]}))
    )
    roles = space.make_plan(spec).roles
    assert roles["method"] == roles["p_detach"] == "scientific"
    assert roles["batch_size"] == "nuisance"
    assert roles["lr"] == roles["task"] == roles["task_options.train_size"] == "fixed"
    assert roles["seed"] == "replicate"
    config = space.plan_trials(spec)[0].config
    flat_keys = {
        "task",
        "seed",
        *config.to_dict(),
        *(f"task_options.{o}" for o in config.task_options),
    }
    flat_keys.discard("task_options")
    assert flat_keys <= set(roles)


def test_plan_text_counts_trials(tmp_path: Path) -> None:
    spec = load_spec(write_space(tmp_path, "plan", tiny_copying()))
    plan = space.make_plan(spec)
    assert (plan.n_trials, len(plan.trials), plan.cells, plan.packed) == (4, 4, (), False)
    text = space.plan_text(plan)
    assert text.splitlines()[0].startswith("plan: 4 trials, searcher grid")
    assert "t0003  method=h_detach p_detach=0.5 seed=1" in text


def test_packs_group_shareable_trials_in_plan_order(tmp_path: Path) -> None:
    # batch_size is a shape: the two batch sizes never share a pack, lr and the method may.
    body = tiny_copying(
        scientific={"method": ["none", "h_detach"], "p_detach": [0.25, 0.5]},
        nuisance={"batch_size": [10, 20]},
        resources={"pack": 3},
    )
    spec = load_spec(write_space(tmp_path, "packs", body))
    plan = space.make_plan(spec)
    packs = plan.packs
    members = {p.pack_id: [t.trial_id for t in p.trials] for p in packs}
    assert members == {
        "p0000": ["t0000", "t0001", "t0004"],
        "p0001": ["t0002", "t0003", "t0006"],
        "p0002": ["t0005", "t0008", "t0009"],
        "p0003": ["t0007", "t0010", "t0011"],
    }
    for pack in packs:
        assert len({t.config.batch_size for t in pack.trials}) == 1
    assert space.make_plan(spec).packs == packs  # deterministic
    in_packs = sorted(t.trial_id for p in packs for t in p.trials)
    assert plan.packed and in_packs == [t.trial_id for t in plan.trials]
    text = space.plan_text(plan)
    assert "  12 trials in 4 packs of <= 3 (one batched model" in text
    assert "  t0004  p0000  method=h_detach p_detach=0.25 batch_size=10 seed=0" in text
    assert text.splitlines()[0].startswith("packs: 12 trials, searcher grid")


def test_packs_split_by_task_options_and_follow_random_draws(tmp_path: Path) -> None:
    body = tiny_copying(
        scientific={"T": [5, 7]},
        nuisance={"lr": {"min": 1.0e-3, "max": 1.0e-2}},
        search={"searcher": "random", "samples_per_cell": 2},
        resources={"pack": 8},
    )
    body["task"] = {"name": "copying", "train_size": 500, "val_size": 100}
    body["scientific"] = {"T": [5, 7]}
    spec = load_spec(write_space(tmp_path, "random_packs", body))
    packs = space.make_plan(spec).packs
    assert [[t.trial_id for t in p.trials] for p in packs] == [
        ["t0000", "t0001", "t0002", "t0003"],
        ["t0004", "t0005", "t0006", "t0007"],
    ]
    assert [p.trials[0].config.task_options["T"] for p in packs] == [5, 7]
    assert len({t.config.lr for t in packs[0].trials}) == 2  # the two draws share a pack


def test_pack_one_is_a_pack_per_trial_and_plans_as_before(tmp_path: Path) -> None:
    spec = load_spec(write_space(tmp_path, "solo", tiny_copying()))
    assert spec.resources.pack == 1
    plan = space.make_plan(spec)
    packs = plan.packs
    assert [[t.trial_id for t in p.trials] for p in packs] == [[f"t{i:04d}"] for i in range(4)]
    assert packs == tuple(space.Pack(space.pack_id(i), (t,)) for i, t in enumerate(plan.trials))
    text = space.plan_text(plan)
    assert "pack" not in text and "  t0000  method=none p_detach=0 seed=0" in text


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_plans_its_smoke_variant(path: Path) -> None:
    spec = load_spec(path, smoke=True)
    plan = space.make_plan(spec)
    text = space.plan_text(plan)
    count = plan.n_trials
    assert 1 <= count <= 8, "a smoke variant should stay a handful of trials"
    assert f": {count} trials" in text.splitlines()[0]
    assert space.make_plan(load_spec(path)).n_trials >= count


def test_format_value() -> None:
    assert space.format_value(None) == "none"
    assert space.format_value(1.0e-3) == "0.001"
    assert space.format_value(True) == "true"
    assert space.format_value(Range(1e-4, 1e-2, "log")) == "log[0.0001, 0.01]"


def test_optuna_cells_of_method_none_collapse_over_p_detach(tmp_path: Path) -> None:
    body = tiny_copying(
        scientific={"method": ["none", "h_detach"], "p_detach": [0.25, 0.5]},
        nuisance={"lr": {"min": 1.0e-3, "max": 1.0e-1, "scaling": "log"}},
        search={"searcher": "optuna", "samples_per_cell": 2},
    )
    spec = load_spec(write_space(tmp_path, "collapse", body))
    plan = space.make_plan(spec)
    cells = plan.cells
    # As the grid: none x {0.25, 0.5} is one cell per seed at p_detach 0, not two alike.
    points = [(cell.point["method"], cell.point["p_detach"], cell.seed) for cell in cells]
    assert points == [
        ("none", 0.0, 0), ("none", 0.0, 1),
        ("h_detach", 0.25, 0), ("h_detach", 0.25, 1),
        ("h_detach", 0.5, 0), ("h_detach", 0.5, 1),
    ]  # fmt: skip
    assert plan.n_trials == 12
    assert "method=none p_detach=0 seed=0: 2 samples" in space.plan_text(plan)


@pytest.mark.parametrize(
    "sections",
    [
        {"scientific": {"method": ["none", "h_detach", "c_detach"], "p_detach": [0.1, 0.5]}},
        # A nonzero p where no method detaches is refused (spec.py); 0 is what none trains at.
        {"scientific": {"method": ["none"], "p_detach": [0.0]}},
        {"scientific": {"p_detach": [0.1, 0.5]}, "fixed": {"method": "h_detach"}},
        {
            "scientific": {"method": ["none", "h_detach"], "p_detach": [0.25, 0.5]},
            "nuisance": {"lr": {"min": 1.0e-3, "max": 1.0e-2, "scaling": "log"}},
            "search": {"searcher": "random", "samples_per_cell": 3},
        },
        {
            "scientific": {"method": ["none", "h_detach"], "p_detach": [0.25, 0.5]},
            "nuisance": {"lr": {"min": 1.0e-3, "max": 1.0e-2, "scaling": "log"}},
            "search": {"searcher": "optuna", "samples_per_cell": 2},
        },
    ],
    ids=["grid", "none_only", "fixed_method", "random", "optuna"],
)
def test_the_count_from_axis_lengths_is_the_plans(tmp_path: Path, sections: dict) -> None:
    spec = load_spec(write_space(tmp_path, "counted", tiny_copying(**sections)))
    count, factors = space.count_trials(spec)
    assert count == space.make_plan(spec).n_trials, factors
    assert factors.endswith("seeds 2")


PAPER = REPO / "search_spaces" / "paper"
H200 = KNOWN_GPUS["h200"]


def test_pack_auto_fills_an_h200_with_pixel_mnist_trials() -> None:
    spec = load_spec(PAPER / "fig4_pixel_mnist_no_clip.yaml")
    plan = space.make_plan(spec, H200)
    # Hidden 100 in 16-unit programs, the batch of 100 in one 128-row program: 7 programs a
    # trial, 132 // 7 = 18 trials resident; the figure's 10 trials make one pack.
    assert (plan.pack_size, plan.packed, plan.gpu) == (18, True, H200)
    assert [len(p.trials) for p in plan.packs] == [10]
    text = space.plan_text(plan).splitlines()
    assert (
        "  packs: auto -> 18 trials per pack on h200 (132 SMs; 7 programs of 128 rows per trial "
        "at batch 100, hidden 100, precision tf32)"
    ) in text
    assert "  10 trials in 1 pack of <= 18 (one batched model and one Ray trial per pack):" in text


def test_pack_auto_in_fp32_holds_fewer_trials() -> None:
    # Full fp32 split kernels spill beyond 32 rows a program (pack_layout.WIDEST_ROWS): 28
    # programs a trial, 132 // 28 = 4 trials; the 10 trials make packs of 4, 4 and 2.
    spec = load_spec(PAPER / "fig4_pixel_mnist_no_clip.yaml", overrides=["fixed.precision=fp32"])
    plan = space.make_plan(spec, H200)
    assert plan.pack_size == 4 and [len(p.trials) for p in plan.packs] == [4, 4, 2]
    assert "28 programs of 32 rows per trial at batch 100, hidden 100, precision fp32" in (
        space.plan_text(plan)
    )


def test_pack_auto_at_copying_hidden_128_is_16_per_pack() -> None:
    plan = space.make_plan(load_spec(PAPER / "fig5_copying_c_detach.yaml"), H200)
    assert plan.pack_size == 16 and [len(p.trials) for p in plan.packs] == [15]
    assert "8 programs of 128 rows per trial at batch 100, hidden 128" in space.plan_text(plan)


def test_pack_auto_without_a_gpu_plans_as_before() -> None:
    for smoke in (False, True):
        spec = load_spec(PAPER / "fig4_pixel_mnist_no_clip.yaml", smoke=smoke)
        plan = space.make_plan(spec)
        assert (plan.pack_size, plan.packed, plan.gpu) == (1, False, None)
        assert all(len(pack.trials) == 1 for pack in plan.packs)
        assert "  packs: auto -> 1 (planned without a GPU; --gpu NAME sizes packs for one)" in (
            space.plan_text(plan).splitlines()
        )


def test_pack_auto_sizes_each_shape_and_keeps_cpu_trials_alone(tmp_path: Path) -> None:
    body = tiny_copying(
        nuisance={"hidden_size": [100, 200]},
        fixed={"batch_size": 100, "device": "auto"},
        resources={"pack": "auto"},
    )
    del body["model"]
    plan = space.make_plan(load_spec(write_space(tmp_path, "shapes", body)), H200)
    sizes = sorted((p.trials[0].config.hidden_size, len(p.trials)) for p in plan.packs)
    assert sizes == [(100, 4), (200, 1), (200, 1), (200, 1), (200, 1)]  # 200: the row kernels
    text = space.plan_text(plan)
    assert "packs: auto -> 18 trials per pack on h200" in text
    assert "packs: auto -> 1 trial per pack on h200 at batch 100, hidden 200 (hidden > 128" in text
    body["fixed"]["device"] = "cpu"
    plan = space.make_plan(load_spec(write_space(tmp_path, "cpu", body)), H200)
    assert not plan.packed and "auto -> 1 at batch 100, hidden 100 (device cpu" in (
        space.plan_text(plan)
    )


def test_pack_auto_with_optuna_is_one(tmp_path: Path) -> None:
    body = tiny_copying(
        nuisance={"lr": {"min": 1.0e-3, "max": 1.0e-2}},
        search={"searcher": "optuna", "samples_per_cell": 2},
        resources={"pack": "auto"},
    )
    plan = space.make_plan(load_spec(write_space(tmp_path, "optuna", body)), H200)
    assert plan.pack_size == 1 and not plan.packed and plan.packs == ()
    assert "packs: auto -> 1 (the optuna searcher suggests one trial at a time)" in (
        space.plan_text(plan)
    )


def test_a_gpu_record_reads_back_and_a_bad_one_is_refused() -> None:
    assert space.gpu_from_record(space.gpu_record(H200)) == H200
    assert space.gpu_record(None) is None and space.gpu_from_record(None) is None
    with pytest.raises(ValueError, match="not a GPU record"):
        space.gpu_from_record({"key": "h200", "name": "NVIDIA H200", "sms": 0})


def test_several_plans_add_up_their_trials_and_packs(tmp_path: Path) -> None:
    packed = space.make_plan(
        load_spec(
            write_space(
                tmp_path,
                "packed",
                tiny_copying(scientific={"method": ["none", "h_detach"]}, resources={"pack": 3}),
            )
        )
    )
    tuned = space.make_plan(
        load_spec(
            write_space(
                tmp_path,
                "tuned",
                tiny_copying(
                    nuisance={"lr": {"min": 1.0e-4, "max": 1.0e-2, "scaling": "log"}},
                    search={"searcher": "optuna", "samples_per_cell": 2},
                ),
            )
        )
    )
    assert (packed.n_trials, len(packed.packs), tuned.n_trials) == (4, 2, 8)
    assert space.plans_total([packed, packed]) == "all 2 studies: 8 trials in 4 packs"
    assert space.plans_total([packed, tuned]) == (
        "all 2 studies: 12 trials in 2 packs; 1 Optuna study, unpacked"
    )


def test_a_grid_point_whose_values_conflict_is_one_line_naming_the_file_and_point(
    tmp_path: Path,
) -> None:
    # Each value is fine alone (load_spec probes them one at a time); the pair is not.
    body = {
        "task": {"name": "copying", "T": 10},
        "scientific": {"anneal_last": [None, 10], "method": ["h_detach"]},
        "nuisance": {"anneal_fraction": [None, 0.1]},
        "fixed": {"p_detach": 0.25, "iterations": 40, "eval_every": 20},
    }
    path = write_space(tmp_path, "combo", body)
    spec = load_spec(path)
    with pytest.raises(ConfigError) as caught:
        space.make_plan(spec)
    assert str(caught.value) == (
        f"{path}: the grid point anneal_last=10, method=h_detach, anneal_fraction=0.1: "
        "anneal_fraction: set it or anneal_last, not both (got anneal_last 10 and "
        "anneal_fraction 0.1); null is off"
    )
