"""device_lstm(): the masked LSTM of the CUDA path, on the Triton kernels where they apply and on
the per-step DeviceMaskedLSTM otherwise (the one place that chooses between them)."""

from __future__ import annotations

import torch

from study.models.step_lstm import DeviceMaskedLSTM


def keep_factors(
    detach: torch.Tensor | None, steps: int, members: int, like: torch.Tensor
) -> torch.Tensor | None:
    """(T, K) keep factors (1 = keep, 0 = detach) from (K, T) or (T,) bool detach masks."""
    if detach is None:
        return None
    mask = detach.to(device=like.device, non_blocking=True)
    mask = mask.reshape(members, steps) if mask.dim() == 2 else mask.reshape(1, steps)
    return (~mask).to(like.dtype).t().contiguous()


def device_lstm(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    keep_h: torch.Tensor | None,
    keep_c: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the masked LSTM: x (T, K, B, I), h0/c0 (K, B, H), stacked nn.LSTM weights.

    On CUDA, where triton_lstm.supports() says so (float32, H <= 256; in full fp32 only where
    the hidden-split kernels fit), this is a persistent Triton kernel pair (one launch per
    direction for the whole sequence); otherwise DeviceMaskedLSTM's step loop. Both compute the
    same function.
    """
    if x.is_cuda:
        from study.models import triton_lstm  # imports triton: only on the CUDA path

        if triton_lstm.supports(x, h0, c0, weights):
            return triton_lstm.triton_lstm(x, h0, c0, weights, keep_h, keep_c)
    return DeviceMaskedLSTM.apply(x, h0, c0, *weights, keep_h, keep_c)
