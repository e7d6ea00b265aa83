"""Seeding: one independent torch.Generator per source of randomness in a trial."""

from __future__ import annotations

import hashlib

import torch

# Each stream gets its own generator so that changing one knob never shifts another's draws:
# a different p_detach must not change the batches a model sees, nor its initial weights.
STREAMS = ("init", "data_order", "detach")


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for `stream`, stable across Python runs and platforms."""
    digest = hashlib.sha256(f"hdetach-study:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded for `stream` (always on CPU unless asked: CPU draws are reproducible)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, stream))
    return generator


def trial_generators(seed: int) -> dict[str, torch.Generator]:
    """The generators of one training run, keyed by stream name."""
    return {stream: make_generator(seed, stream) for stream in STREAMS}
