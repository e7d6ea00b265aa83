"""Every paper space against its figure's caption (../shared/PAPER.md's table): the task, the
axes that vary, clipping, the methods compared, >= 5 seeds, the authors' annealing, packs sized
for the GPU, and claims."""

from __future__ import annotations

import pytest
from conftest import REPO

from study.space import make_plan
from study.spec import load_spec

PAPER = REPO / "search_spaces" / "paper"
# file stem -> (task, task options that must hold, varied axes, clip_norm, methods)
CAPTIONS = {
    "fig2_copying": ("copying", {}, {"T", "method", "p_detach"}, 1.0, {"none", "h_detach"}),
    "fig3_pixel_mnist_lr": ("pixel_mnist", {}, {"method", "lr"}, 1.0, {"none", "h_detach"}),
    "fig4_pixel_mnist_no_clip": ("pixel_mnist", {}, {"method"}, None, {"none", "h_detach"}),
    "fig5_copying_c_detach": (
        "copying",
        {"T": 100},
        {"method", "p_detach"},
        1.0,
        {"none", "c_detach"},
    ),
    "fig5_pixel_mnist_c_detach": ("pixel_mnist", {}, {"method"}, 1.0, {"none", "c_detach"}),
    "fig6_pixel_mnist_lr_seeds": ("pixel_mnist", {}, {"method", "lr"}, 1.0, {"none", "h_detach"}),
    "fig7_permuted_mnist": ("permuted_mnist", {}, {"method"}, 1.0, {"none", "h_detach"}),
    "fig8_pixel_mnist_no_clip_lr_seeds": (
        "pixel_mnist",
        {},
        {"method", "lr"},
        None,
        {"none", "h_detach"},
    ),
}
# The authors' `--anneal-p 40` (bhargav104/h-detach): no detaching for the last 39 epochs.
ANNEAL = {"copying": 39 / 600, "pixel_mnist": 39 / 200, "permuted_mnist": 39 / 200}
BUDGET = {"copying": 600_000, "pixel_mnist": 100_000, "permuted_mnist": 100_000}


def test_the_table_covers_every_paper_space_and_figures_2_to_8():
    assert {p.stem for p in PAPER.glob("*.yaml")} == set(CAPTIONS)
    assert {int(stem[3]) for stem in CAPTIONS} == set(range(2, 9))


@pytest.mark.parametrize("stem", sorted(CAPTIONS))
def test_space_matches_its_caption(stem):
    task, options, varied, clip, methods = CAPTIONS[stem]
    spec = load_spec(PAPER / f"{stem}.yaml")
    axes = {p for p, a in {**spec.scientific, **spec.nuisance}.items() if len(a) > 1}
    assert spec.task == task
    assert options.items() <= spec.task_options.items()
    assert axes == varied, axes
    assert spec.fixed["clip_norm"] == clip
    assert set(spec.scientific["method"]) == methods
    assert len(spec.seeds) >= 5
    assert spec.fixed["iterations"] == BUDGET[task] == spec.base_iterations
    assert spec.fixed["anneal_fraction"] == pytest.approx(ANNEAL[task], abs=5e-4)
    if "lr" in varied:
        assert {1.0e-3, 5.0e-4, 1.0e-4} <= set(spec.nuisance["lr"])
    # Packs sized for the GPU (issue 18); without one (CI's smoke runs) a pack per trial.
    assert spec.resources.pack == "auto"
    assert not make_plan(load_spec(PAPER / f"{stem}.yaml", smoke=True)).packed


@pytest.mark.parametrize("stem", sorted(CAPTIONS))
def test_space_states_its_figures_claims(stem):
    spec = load_spec(PAPER / f"{stem}.yaml")
    figure = int(stem[3])
    text = (PAPER / f"{stem}.yaml").read_text()
    assert text.startswith(f"# Paper Fig. {figure}")
    assert spec.claims and all(claim.figure == figure for claim in spec.claims)
    assert all(claim.id.startswith(f"fig{figure}-") for claim in spec.claims)
    methods = set(spec.scientific["method"])
    for claim in spec.claims:
        assert {claim.method, claim.baseline} - {None} <= methods
    # The smoke variant is the same study cut down: the same claims, the same methods.
    smoke = load_spec(PAPER / f"{stem}.yaml", smoke=True)
    assert smoke.claims == spec.claims and set(smoke.scientific["method"]) == methods
