"""Big CPU buffers of the masked LSTM, reused across training steps once nothing holds them."""

from __future__ import annotations

import math

import torch

# Elements per alignment unit: 64 bytes in float32, the CPU allocator's alignment.
ALIGN = 16


def aligned_blocks(members: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An empty (K, *shape) tensor whose K blocks each start 64-byte aligned.

    MKL's GEMM can round differently for differently aligned operands, so every member operand
    must sit at the alignment its solo run's fresh tensor has for the member's bits to match.
    """
    size = math.prod(shape)
    stride = -(-size // ALIGN) * ALIGN
    return like.new_empty(members, stride)[:, :size].view(members, *shape)


def _holders(tensor: torch.Tensor) -> int:
    """How many tensors (views, autograd's saved copies) share `tensor`'s memory."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class Workspace:
    """Hands out (K, *shape) buffers, reusing one only when nothing else refers to it any more.

    A step's buffers at the pixel-MNIST shape are 300 MB and more. Fresh, they come from mmap
    each step (glibc returns them to the OS above its mmap threshold) and page-fault in as they
    are first written: measured, a third of a step's time. A buffer is free again once autograd
    has dropped the tensors it saved for the backward and the caller the outputs that view it,
    which its storage's use count tells; so reuse is safe whatever the caller does (retain_graph,
    keeping outputs, forwards without a backward).
    """

    def __init__(self) -> None:
        self.buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, its holders when free)

    # Scratch memory, not state: a copied or pickled model (torch.save(model), deepcopy) starts
    # with an empty workspace instead of carrying hundreds of MB of stale buffers.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.buffers = []

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()

    def take(self, members: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A (members, *shape) buffer of `like`'s dtype and device, member blocks aligned."""
        wanted = (members, *shape)
        kept = []
        for buffer, free_count in self.buffers:
            if _holders(buffer) > free_count:
                kept.append((buffer, free_count))  # in use
            elif buffer.shape == wanted and buffer.dtype == like.dtype:
                # A new view, so that the buffer counts as held while the caller has it.
                return buffer.view(wanted)
            # free, of another shape: dropped, so a changed shape does not keep old memory
        buffer = aligned_blocks(members, shape, like)
        kept.append((buffer, _holders(buffer)))
        self.buffers = kept
        return buffer.view(wanted)
