"""Gradient-blocking methods (the thing under study): none, h_detach and c_detach."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DetachMasks:
    """Per-step masks for one minibatch; None means "never detach" for that path."""

    detach_h: torch.Tensor | None
    detach_c: torch.Tensor | None


class Method:
    """Draws the per-step detach masks for each minibatch.

    Paper, Algorithm 1: at every time step one Bernoulli(p) draw, shared by the whole minibatch,
    decides whether the gradient is blocked. `p` is the probability of *detaching*.
    """

    name = "none"
    path: str | None = None  # "h" or "c": which recurrent path the draw cuts

    def __init__(self, p_detach: float = 0.0, anneal_last: int | None = None) -> None:
        self.p_detach = p_detach
        self.anneal_last = anneal_last

    def masks(
        self, seq_len: int, iteration: int, total_iterations: int, generator: torch.Generator
    ) -> DetachMasks:
        """Masks for the minibatch at `iteration` (0-based) of a `total_iterations` budget.

        The draw is made even when annealed or p=0 so the detach stream stays aligned with the
        iteration count: a run with annealing sees the same draws as one without, up to the switch.
        """
        if self.path is None:
            return DetachMasks(None, None)
        draws = torch.rand(seq_len, generator=generator) < self.p_detach
        if self.annealed(iteration, total_iterations):
            draws = torch.zeros_like(draws)
        if self.path == "h":
            return DetachMasks(draws, None)
        return DetachMasks(None, draws)

    def annealed(self, iteration: int, total_iterations: int) -> bool:
        """Authors' option: no detaching in the last `anneal_last` iterations of training (the
        count annealed_iterations() gives for either way of setting it)."""
        return self.anneal_last is not None and iteration >= total_iterations - self.anneal_last


class NoDetach(Method):
    """Vanilla LSTM: full backpropagation through time."""

    name = "none"
    path = None


class HDetach(Method):
    """h-detach: cut h_{t-1} -> gates_t; the cell path c_{t-1} -> c_t stays (paper Sec. 4)."""

    name = "h_detach"
    path = "h"


class CDetach(Method):
    """c-detach ablation (paper Fig. 5): cut the linear cell path c_{t-1} -> c_t instead."""

    name = "c_detach"
    path = "c"


METHODS: dict[str, type[Method]] = {
    "none": NoDetach,
    "h_detach": HDetach,
    "c_detach": CDetach,
}


def make_method(name: str, p_detach: float = 0.0, anneal_last: int | None = None) -> Method:
    return METHODS[name](p_detach=p_detach, anneal_last=anneal_last)


def annealed_iterations(
    anneal_last: int | None, anneal_fraction: float | None, iterations: int
) -> int | None:
    """How many final iterations train without detaching (None: none): `anneal_last` as given,
    or `anneal_fraction` of the iteration budget, rounded (Python's round, half to even).

    The fraction is the authors' protocol at any budget: their scripts switch h-detach off once
    epoch > epochs - 40 (epochs counted from 0), i.e. for the last 39 of 600 copying epochs
    (0.065) and the last 39 of 200 pixel MNIST epochs (0.195).
    """
    if anneal_fraction is not None:
        return round(anneal_fraction * iterations)
    return anneal_last
