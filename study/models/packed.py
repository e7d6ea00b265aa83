"""K independent h-detach LSTM classifiers stacked into one batched model (trial packing)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from study.models.classifier import SequenceClassifier
from study.models.detach_lstm import Tape, masked_lstm_backward, masked_lstm_forward
from study.models.device_lstm import device_lstm, keep_factors
from study.models.workspace import ALIGN, Workspace, aligned_blocks

# A member's parameters in SequenceClassifier order (its state_dict names).
MEMBER_NAMES = (
    "lstm.weight_ih_l0",
    "lstm.weight_hh_l0",
    "lstm.bias_ih_l0",
    "lstm.bias_hh_l0",
    "head.weight",
    "head.bias",
)


class _PackedCPUFunction(torch.autograd.Function):
    """DetachLSTM's CPU forward and masked BPTT for K members stacked member-major.

    Each member runs exactly its solo run's calls (study.models.detach_lstm), on buffers at its
    solo run's alignment (`aligned_blocks`: MKL's results can depend on it), so its numbers are
    bit-identical to the solo run's; tests/test_packed.py pins this down. On a CPU packing saves
    the per-trial overheads around the LSTM (one optimizer, one clipping, one process), not the
    LSTM's own work. Layout: x (K, T, B, I), weights (K, 4H, ...).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight_ih: torch.Tensor,
        weight_hh: torch.Tensor,
        bias_ih: torch.Tensor,
        bias_hh: torch.Tensor,
        detach_h: list[list[bool]] | None,
        detach_c: list[list[bool]] | None,
        workspace: Workspace,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        members, steps, batch, input_size = x.shape
        hidden = weight_hh.shape[2]
        x = aligned_blocks(members, (steps, batch, input_size), x).copy_(x)
        tape = Tape.take(workspace, members, (steps, batch, hidden), x)
        zeros = x.new_zeros(batch, hidden)
        for k in range(members):
            weights = (weight_ih[k], weight_hh[k], bias_ih[k], bias_hh[k])
            masked_lstm_forward(x[k], zeros, zeros, weights, tape.member(k))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight_ih, weight_hh, tape.hs, tape.cs, tape.tanh_cs, tape.gates)
        ctx.detach = (detach_h, detach_c)
        ctx.workspace = workspace
        return tape.hs[:, 1:], tape.hs[:, steps], tape.cs[:, steps]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_output: torch.Tensor | None,
        grad_h_n: torch.Tensor | None,
        grad_c_n: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight_ih, weight_hh, *saved = ctx.saved_tensors
        tape = Tape(*saved)
        members = x.shape[0]
        grad_gates = ctx.workspace.take(members, tuple(tape.gates.shape[1:]), x)
        detach_h, detach_c = ctx.detach
        needs = ctx.needs_input_grad
        per_member = []
        for k in range(members):
            per_member.append(
                masked_lstm_backward(
                    x[k],
                    (weight_ih[k], weight_hh[k]),
                    tape.member(k),
                    tuple(None if g is None else g[k] for g in (grad_output, grad_h_n, grad_c_n)),
                    (detach_h[k] if detach_h else None, detach_c[k] if detach_c else None),
                    grad_gates[k],
                    (needs[0], False, False, needs[1], needs[2], needs[3] or needs[4]),
                )
            )
        grad_x, _, _, grad_w_ih, grad_w_hh, grad_bias = (
            None if grads[0] is None else torch.stack(grads)
            for grads in zip(*per_member, strict=True)
        )
        return grad_x, grad_w_ih, grad_w_hh, grad_bias, grad_bias, None, None, None


def _step_flags(mask: torch.Tensor | None) -> list[list[bool]] | None:
    if mask is None:
        return None
    flags = mask.bool().tolist()
    return flags if any(any(row) for row in flags) else None


class PackedClassifier(nn.Module):
    """K SequenceClassifiers (LSTM + linear head) stored as one (K, N) parameter `flat`.

    Row k is member k's parameters flattened in `MEMBER_NAMES` order, so the optimizer, the
    per-member gradient norms and the clipping each run as one batched op over all members.
    `forward` takes x (K, T, B, I) and per-member detach masks (K, T) and returns logits
    (K, T', B, C) for the last T' = `readout_steps` steps (None: every step).
    """

    def __init__(self, members: int, input_size: int, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.members = members
        self.hidden_size = hidden_size
        four_h = 4 * hidden_size
        self.shapes = (
            (four_h, input_size),
            (four_h, hidden_size),
            (four_h,),
            (four_h,),
            (num_classes, hidden_size),
            (num_classes,),
        )
        # Each member tensor starts 64-byte aligned in its row, as a solo parameter does.
        sizes = [-(-math.prod(shape) // ALIGN) * ALIGN for shape in self.shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.flat = nn.Parameter(torch.zeros(members, self.offsets[-1]))
        # None: the device path (mask tensors, fused cells) exactly when x is on CUDA. Tests set
        # True to run that path on a CPU, where it uses reference cells.
        self.device_path: bool | None = None
        self.workspace = Workspace()

    @classmethod
    def from_members(cls, models: list[SequenceClassifier]) -> PackedClassifier:
        """Stack the members' current parameters (each keeps exactly its own init)."""
        first = models[0]
        packed = cls(
            len(models), first.lstm.input_size, first.lstm.hidden_size, first.head.out_features
        )
        packed.to(first.head.weight)  # device and dtype
        for k, model in enumerate(models):
            packed.load_member(k, model)
        return packed

    def views(self, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """(K, *shape) views of `flat` (default: the parameter), in MEMBER_NAMES order."""
        flat = self.flat if flat is None else flat
        return [
            flat[:, start : start + math.prod(shape)].view(self.members, *shape)
            for start, shape in zip(self.offsets, self.shapes, strict=False)
        ]

    def member_views(self, flat: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Member k's tensors in `flat` (parameters, gradients or optimizer moments)."""
        return [view[k] for view in self.views(flat)]

    @torch.no_grad()
    def load_member(self, k: int, model: SequenceClassifier) -> None:
        state = model.state_dict()
        for name, view in zip(MEMBER_NAMES, self.member_views(self.flat, k), strict=True):
            view.copy_(state[name])

    @torch.no_grad()
    def store_member(self, k: int, model: SequenceClassifier) -> None:
        """Copy member k's parameters into a solo model (for evaluation and checkpoints)."""
        state = model.state_dict()
        for name, view in zip(MEMBER_NAMES, self.member_views(self.flat, k), strict=True):
            state[name].copy_(view)

    def forward(
        self,
        x: torch.Tensor,
        detach_h: torch.Tensor | None = None,
        detach_c: torch.Tensor | None = None,
        readout_steps: int | None = None,
    ) -> torch.Tensor:
        weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias = self.views()
        members, steps, batch, _ = x.shape
        # As in SequenceClassifier: one read-out step is h_n, so no gradient of zeros per step.
        last_only = readout_steps == 1
        first = 0 if readout_steps is None else max(steps - readout_steps, 0)  # first step read
        if x.is_cuda if self.device_path is None else self.device_path:
            state = x.new_zeros(members, batch, self.hidden_size)
            output, h_n, _ = device_lstm(
                x.transpose(0, 1),
                state,
                state,
                (weight_ih, weight_hh, bias_ih, bias_hh),
                keep_factors(detach_h, steps, members, x),
                keep_factors(detach_c, steps, members, x),
            )
            if last_only:
                logits = torch.baddbmm(head_bias.unsqueeze(1), h_n, head_weight.transpose(1, 2))
                return logits.unsqueeze(1)
            if first:
                output = output[first:]
            logits = torch.matmul(output, head_weight.transpose(1, 2)) + head_bias.unsqueeze(1)
            return logits.transpose(0, 1)  # (T, K, B, C) -> (K, T, B, C)
        output, h_n, _ = _PackedCPUFunction.apply(
            x,
            weight_ih,
            weight_hh,
            bias_ih,
            bias_hh,
            _step_flags(detach_h),
            _step_flags(detach_c),
            self.workspace,
        )
        # The head per member, as nn.Linear runs it in the solo model (same GEMM, same bits).
        if last_only:
            features = [h.unsqueeze(0) for h in h_n.unbind(0)]
        else:
            features = [member[first:] if first else member for member in output.unbind(0)]
        logits = [
            F.linear(feature, head_weight[k], head_bias[k]) for k, feature in enumerate(features)
        ]
        return torch.stack(logits)
