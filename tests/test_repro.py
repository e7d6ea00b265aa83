"""Seeding: every stream has its own stable generator."""

from __future__ import annotations

import torch

from study.repro import derive_seed, make_generator


def test_streams_are_distinct_and_stable() -> None:
    seeds = {stream: derive_seed(0, stream) for stream in ("init", "data_order", "detach")}
    assert len(set(seeds.values())) == 3
    assert derive_seed(0, "init") == derive_seed(0, "init")
    assert derive_seed(0, "init") != derive_seed(1, "init")
    # A fixed value guards against an accidental change of the derivation (it would silently
    # change every published curve).
    assert derive_seed(0, "init") == 4155077888662410892


def test_generators_reproduce_draws() -> None:
    a = torch.rand(5, generator=make_generator(7, "detach"))
    b = torch.rand(5, generator=make_generator(7, "detach"))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(5, generator=make_generator(7, "init")))
