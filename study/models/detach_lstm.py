"""DetachLSTM: an nn.LSTM-compatible single-layer LSTM with exact masked backprop (h-/c-detach)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from study.models.cpu_cells import cells_for
from study.models.device_lstm import device_lstm, keep_factors
from study.models.workspace import Workspace


@dataclass
class Tape:
    """What the CPU forward of one sequence keeps for its backward (T steps, batch B, hidden H)."""

    hs: torch.Tensor  # (T+1, B, H): hs[t] = h_{t-1}, hs[0] = h0
    cs: torch.Tensor  # (T+1, B, H): cs[t] = c_{t-1}
    tanh_cs: torch.Tensor  # (T, B, H): tanh(c_t)
    gates: torch.Tensor  # (T, B, 4H): the activated i, f, g, o

    @classmethod
    def take(
        cls, workspace: Workspace, members: int, shape: tuple[int, int, int], like: torch.Tensor
    ) -> Tape:
        """Buffers for K sequences of shape (T, B, H), stacked member-major: (K, T+1, B, H)..."""
        steps, batch, hidden = shape
        return cls(
            workspace.take(members, (steps + 1, batch, hidden), like),
            workspace.take(members, (steps + 1, batch, hidden), like),
            workspace.take(members, (steps, batch, hidden), like),
            workspace.take(members, (steps, batch, 4 * hidden), like),
        )

    def member(self, k: int) -> Tape:
        """Member k's tape of a stacked one."""
        return Tape(self.hs[k], self.cs[k], self.tanh_cs[k], self.gates[k])


def masked_lstm_forward(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tape: Tape,
) -> None:
    """A plain LSTM forward on a CPU, filling `tape`: x (T, B, I), nn.LSTM's four weights.

    h-detach changes gradients only (paper Sec. 4: "the forward pass is unchanged"). Per step:
    one GEMM (torch) and one pass of pointwise work (study.models.cpu_cells).
    """
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    steps, batch, input_size = x.shape
    tape.hs[0].copy_(h0)
    tape.cs[0].copy_(c0)
    # All input projections in one GEMM, both biases folded in, written into the gate buffer;
    # each step then adds its recurrent GEMM in place.
    torch.addmm(
        bias_ih + bias_hh,
        x.reshape(steps * batch, input_size),
        weight_ih.t(),
        out=tape.gates.view(steps * batch, -1),
    )
    weight_hh_t = weight_hh.t()
    cells = cells_for(x)
    # Per-step views made in one C++ call each (unbind), not T Python indexings.
    step_views = zip(
        tape.gates.unbind(0),
        tape.hs[:-1].unbind(0),
        tape.hs[1:].unbind(0),
        tape.cs[:-1].unbind(0),
        tape.cs[1:].unbind(0),
        tape.tanh_cs.unbind(0),
        strict=True,
    )
    for gates, h_prev, h_next, c_prev, c_next, tanh_c in step_views:
        gates.addmm_(h_prev, weight_hh_t)
        cells.forward(gates, c_prev, c_next, tanh_c, h_next)


def masked_lstm_backward(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    tape: Tape,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    detach: tuple[list[bool] | None, list[bool] | None],
    grad_gates: torch.Tensor,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Masked BPTT for `masked_lstm_forward`: gradients of (x, h0, c0, W_ih, W_hh, bias).

    `grads` are those of (output, h_n, c_n), None when unused; `detach` the per-step h- and
    c-detach flags; `grad_gates` (T, B, 4H) receives d loss / d gate pre-activations; `needs`
    says which of the six gradients to form (the others come back None).
    """
    weight_ih, weight_hh = weights
    grad_output, dh, dc = (None if g is None else g.contiguous() for g in grads)
    steps, batch, input_size = x.shape
    hidden = weight_hh.shape[1]
    detach_h = detach[0] or [False] * steps
    detach_c = detach[1] or [False] * steps
    cells = cells_for(x)
    dh_next, dc_next = x.new_empty(batch, hidden), x.new_empty(batch, hidden)
    grad_output_s = grad_output.unbind(0) if grad_output is not None else [None] * steps
    step_views = zip(
        tape.gates.unbind(0),
        tape.cs[:-1].unbind(0),
        tape.tanh_cs.unbind(0),
        grad_output_s,
        grad_gates.unbind(0),
        strict=True,
    )
    for t, (act, c_prev, tanh_c, grad_out, grad_gate) in reversed(list(enumerate(step_views))):
        cells.backward(act, c_prev, tanh_c, dh, grad_out, dc, grad_gate, dc_next)
        # c-detach cuts c_{t-1} -> c_t; h-detach cuts h_{t-1} -> gates_t (GEMM skipped).
        dc = None if detach_c[t] else dc_next
        dh = None if detach_h[t] else torch.mm(grad_gate, weight_hh, out=dh_next)

    flat_grad = grad_gates.view(steps * batch, 4 * hidden)
    grad_x = grad_h0 = grad_c0 = grad_w_ih = grad_w_hh = grad_bias = None
    if needs[0]:
        grad_x = torch.mm(flat_grad, weight_ih).view(steps, batch, input_size)
    if needs[1]:
        grad_h0 = dh if dh is not None else x.new_zeros(batch, hidden)
    if needs[2]:
        grad_c0 = dc if dc is not None else x.new_zeros(batch, hidden)
    # Weight gradients are not masked: W_hh still multiplies the (detached) h_{t-1}.
    if needs[3]:
        grad_w_ih = torch.mm(flat_grad.t(), x.reshape(steps * batch, input_size))
    if needs[4]:
        grad_w_hh = torch.mm(flat_grad.t(), tape.hs[:-1].reshape(steps * batch, hidden))
    if needs[5]:
        grad_bias = flat_grad.sum(0)
    return grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias


class _MaskedLSTMFunction(torch.autograd.Function):
    """The whole sequence as one autograd node: forward once, hand-written masked BPTT."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
        weight_ih: torch.Tensor,
        weight_hh: torch.Tensor,
        bias_ih: torch.Tensor,
        bias_hh: torch.Tensor,
        detach_h: list[bool] | None,
        detach_c: list[bool] | None,
        workspace: Workspace,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        steps, batch, _ = x.shape
        tape = Tape.take(workspace, 1, (steps, batch, weight_hh.shape[1]), x).member(0)
        masked_lstm_forward(x, h0, c0, (weight_ih, weight_hh, bias_ih, bias_hh), tape)
        # Unused outputs (h_n for copying, the sequence for a last-step read-out) arrive as None
        # rather than zeros, so the backward skips adding them.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight_ih, weight_hh, tape.hs, tape.cs, tape.tanh_cs, tape.gates)
        ctx.detach = (detach_h, detach_c)
        ctx.workspace = workspace
        return tape.hs[1:], tape.hs[steps], tape.cs[steps]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_output: torch.Tensor | None,
        grad_h_n: torch.Tensor | None,
        grad_c_n: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight_ih, weight_hh, *saved = ctx.saved_tensors
        tape = Tape(*saved)
        needs = ctx.needs_input_grad
        grads = masked_lstm_backward(
            x,
            (weight_ih, weight_hh),
            tape,
            (grad_output, grad_h_n, grad_c_n),
            ctx.detach,
            ctx.workspace.take(1, tuple(tape.gates.shape), x)[0],
            (*needs[:5], needs[5] or needs[6]),
        )
        grad_bias = grads[5]
        return (*grads, grad_bias, None, None, None)


def _as_step_flags(mask: torch.Tensor | None, steps: int, name: str) -> list[bool] | None:
    if mask is None:
        return None
    if mask.shape != (steps,):
        raise ValueError(f"{name} must have shape ({steps},), got {tuple(mask.shape)}")
    flags = mask.bool().tolist()
    return flags if any(flags) else None


class DetachLSTM(nn.Module):
    """One-layer LSTM with `torch.nn.LSTM`'s parameters (names, shapes, gate order, init).

    `forward(x, state, detach_h, detach_c)`: x is time-major (T, B, I); `detach_h[t]` cuts the
    gradient of h_{t-1} entering the gates at step t, `detach_c[t]` cuts c_{t-1} -> c_t.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters()
        # The CPU path's per-sequence buffers, reused from step to step (not module state).
        self.workspace = Workspace()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch and the authors do."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.uniform_(-bound, bound, generator=generator)

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        detach_h: torch.Tensor | None = None,
        detach_c: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        steps, batch, _ = x.shape
        if state is None:
            h0 = x.new_zeros(batch, self.hidden_size)
            c0 = x.new_zeros(batch, self.hidden_size)
        else:
            h0, c0 = state[0].reshape(batch, -1), state[1].reshape(batch, -1)
        if not torch.is_grad_enabled():
            # Evaluation: no backward, so no masks matter; torch's fused LSTM (oneDNN on CPU,
            # cuDNN on GPU) is faster and keeps no per-step buffers.
            with warnings.catch_warnings():
                # cuDNN would like one flat weight buffer; evaluation is rare, the copy is cheap.
                warnings.filterwarnings("ignore", message="RNN module weights")
                output, h_n, c_n = torch.lstm(
                    x,
                    (h0.unsqueeze(0), c0.unsqueeze(0)),
                    list(self.parameters()),
                    True,
                    1,
                    0.0,
                    False,
                    False,
                    False,
                )
            return output, (h_n, c_n)
        if x.is_cuda:
            return self._device_forward(x, h0, c0, detach_h, detach_c)
        output, h_n, c_n = _MaskedLSTMFunction.apply(
            x,
            h0,
            c0,
            self.weight_ih_l0,
            self.weight_hh_l0,
            self.bias_ih_l0,
            self.bias_hh_l0,
            _as_step_flags(detach_h, steps, "detach_h"),
            _as_step_flags(detach_c, steps, "detach_c"),
            self.workspace,
        )
        return output, (h_n.unsqueeze(0), c_n.unsqueeze(0))

    def _device_forward(
        self,
        x: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
        detach_h: torch.Tensor | None,
        detach_c: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """CUDA path: masks stay on the device and act by multiplication (no host sync, so the
        training step can be captured in a CUDA graph); each step is one GEMM plus PyTorch's
        fused LSTM-cell kernels. The same function with K=1 of study.models.device_lstm."""
        steps = x.shape[0]
        for name, mask in (("detach_h", detach_h), ("detach_c", detach_c)):
            if mask is not None and mask.shape != (steps,):
                raise ValueError(f"{name} must have shape ({steps},), got {tuple(mask.shape)}")
        output, h_n, c_n = device_lstm(
            x.unsqueeze(1),
            h0.unsqueeze(0),
            c0.unsqueeze(0),
            (
                self.weight_ih_l0.unsqueeze(0),
                self.weight_hh_l0.unsqueeze(0),
                self.bias_ih_l0.unsqueeze(0),
                self.bias_hh_l0.unsqueeze(0),
            ),
            keep_factors(detach_h, steps, 1, x),
            keep_factors(detach_c, steps, 1, x),
        )
        return output.squeeze(1), (h_n, c_n)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"
