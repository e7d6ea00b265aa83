"""Gradient-blocking methods: draw rates, one draw per step shared by the batch, annealing."""

from __future__ import annotations

import pytest
import torch

from study.config import TrialConfig
from study.methods import METHODS, annealed_iterations, make_method
from study.trial import TrialState


@pytest.mark.parametrize("name,path", [("h_detach", "h"), ("c_detach", "c")])
@pytest.mark.parametrize("p", [0.25, 0.5])
def test_draw_rate_matches_p(name: str, path: str, p: float) -> None:
    method = make_method(name, p)
    generator = torch.Generator().manual_seed(1)
    draws = [method.masks(200, i, 1000, generator) for i in range(100)]
    masks = torch.stack([getattr(d, f"detach_{path}") for d in draws]).float()
    other = "c" if path == "h" else "h"
    assert all(getattr(d, f"detach_{other}") is None for d in draws)
    assert masks.shape == (100, 200)  # one draw per time step, shared by the minibatch
    assert abs(masks.mean().item() - p) < 0.01  # 20,000 draws: 4 standard errors is ~0.012


def test_vanilla_never_detaches() -> None:
    masks = make_method("none").masks(50, 0, 10, torch.Generator())
    assert masks.detach_h is None and masks.detach_c is None


def test_annealing_switches_detaching_off_for_the_last_iterations() -> None:
    method = make_method("h_detach", 1.0, anneal_last=3)
    generator = torch.Generator().manual_seed(0)
    cuts = [bool(method.masks(5, i, 10, generator).detach_h.any()) for i in range(10)]
    assert cuts == [True] * 7 + [False] * 3


def test_annealing_keeps_earlier_draws_aligned() -> None:
    """With or without annealing, the draws before the switch are identical."""
    plain, annealed = make_method("h_detach", 0.5), make_method("h_detach", 0.5, anneal_last=2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i in range(8):
        a, b = plain.masks(20, i, 10, g1), annealed.masks(20, i, 10, g2)
        assert torch.equal(a.detach_h, b.detach_h)


def test_annealing_by_fraction_scales_with_the_budget() -> None:
    # The authors' protocol: h-detach off for the last 39 of 600 epochs (epoch > 600 - 40).
    assert annealed_iterations(None, 39 / 600, 600) == 39
    assert annealed_iterations(None, 0.065, 6000) == 390
    assert annealed_iterations(None, 0.0, 50) == 0
    assert annealed_iterations(None, 0.25, 10) == 2  # 2.5 rounds half to even
    assert annealed_iterations(7, None, 100) == 7 and annealed_iterations(None, None, 100) is None
    method = make_method("h_detach", 1.0, annealed_iterations(None, 0.3, 10))
    generator = torch.Generator().manual_seed(0)
    cuts = [bool(method.masks(5, i, 10, generator).detach_h.any()) for i in range(10)]
    assert cuts == [True] * 7 + [False] * 3


def test_a_trial_anneals_by_fraction_as_by_the_same_count() -> None:
    base = dict(method="h_detach", p_detach=1.0, task_options={"T": 2, "train_size": 5})
    cpu = torch.device("cpu")
    by_fraction = TrialState(TrialConfig(**base, iterations=40, anneal_fraction=0.1), cpu)
    by_count = TrialState(TrialConfig(**base, iterations=40, anneal_last=4), cpu)
    assert by_fraction.method.anneal_last == by_count.method.anneal_last == 4


def test_registry_names_are_the_yaml_words() -> None:
    assert list(METHODS) == ["none", "h_detach", "c_detach"]
    assert all(METHODS[name].name == name for name in METHODS)
