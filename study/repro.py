"""Seeding: one independent torch.Generator per source of randomness in a trial."""

from __future__ import annotations

import hashlib

import torch

# Each source of randomness (init, data order, detach draws, pMNIST permutation, copying data)
# gets its own stream, so changing one knob never shifts another's draws: a different p_detach
# must not change the batches a model sees, nor its initial weights.


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for `stream`, stable across Python runs and platforms."""
    digest = hashlib.sha256(f"hdetach-study:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded for `stream` (always on CPU unless asked: CPU draws are reproducible)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, stream))
    return generator
