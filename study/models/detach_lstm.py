"""DetachLSTM: an nn.LSTM-compatible single-layer LSTM with exact masked backprop (h-/c-detach)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from study.models.device_lstm import device_lstm, keep_factors


class _MaskedLSTMFunction(torch.autograd.Function):
    """The whole sequence as one autograd node: forward once, hand-written masked BPTT.

    h-detach changes gradients only (paper Sec. 4: "the forward pass is unchanged"), so the forward
    is a plain LSTM and the masks act only in the backward recursion below.
    """

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        steps, batch, input_size = x.shape
        hidden = weight_hh.shape[1]
        hs = x.new_empty(steps + 1, batch, hidden)  # hs[t] = h_{t-1}; hs[0] = h0
        cs = x.new_empty(steps + 1, batch, hidden)
        tanh_cs = x.new_empty(steps, batch, hidden)
        hs[0].copy_(h0)
        cs[0].copy_(c0)
        two_h, three_h = 2 * hidden, 3 * hidden
        # tanh(z) = 2 sigmoid(2z) - 1: doubling the g rows lets one sigmoid over all four gates
        # replace a slow strided tanh. The doubled copies are made once per sequence.
        gate_scale = x.new_ones(4 * hidden, 1)
        gate_scale[two_h:three_h] = 2.0
        weight_hh_t = (weight_hh * gate_scale).t()
        # All input projections in one GEMM, written straight into the gate buffer; both biases
        # folded in once. Each step then adds its recurrent GEMM in place.
        gates = torch.addmm(
            (bias_ih + bias_hh) * gate_scale.squeeze(1),
            x.reshape(steps * batch, input_size),
            (weight_ih * gate_scale).t(),
        ).view(steps, batch, 4 * hidden)
        # Per-step views made in one C++ call each (unbind) instead of T Python indexings: at
        # 784 steps (pixel MNIST) the Python overhead per op is what separates us from oneDNN.
        one, minus_one = x.new_ones(()), -x.new_ones(())
        step_views = zip(
            gates.unbind(0),
            gates[..., :hidden].unbind(0),
            gates[..., hidden:two_h].unbind(0),
            gates[..., two_h:three_h].unbind(0),
            gates[..., three_h:].unbind(0),
            hs[:-1].unbind(0),
            hs[1:].unbind(0),
            cs[:-1].unbind(0),
            cs[1:].unbind(0),
            tanh_cs.unbind(0),
            strict=True,
        )
        for gate, i, f, g, o, h_prev, h_next, c_prev, c_next, tanh_c in step_views:
            gate.addmm_(h_prev, weight_hh_t)  # gate becomes the activated i, f, g, o
            gate.sigmoid_()
            torch.addcmul(minus_one, g, one, value=2.0, out=g)  # g = 2 sigmoid(2z) - 1
            torch.mul(f, c_prev, out=c_next)
            c_next.addcmul_(i, g)
            # tanh(c) = 2 sigmoid(2c) - 1 again: three fast ops beat one slow torch.tanh here.
            torch.mul(c_next, 2.0, out=tanh_c).sigmoid_()
            torch.addcmul(minus_one, tanh_c, one, value=2.0, out=tanh_c)
            torch.mul(o, tanh_c, out=h_next)
        # Unused outputs (h_n for copying, the sequence for a last-step read-out) arrive as None
        # rather than zeros, so the backward skips adding them.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight_ih, weight_hh, hs, cs, gates, tanh_cs)
        ctx.detach_h = detach_h
        ctx.detach_c = detach_c
        return hs[1:], hs[steps], cs[steps]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_output: torch.Tensor | None,
        grad_h_n: torch.Tensor | None,
        grad_c_n: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight_ih, weight_hh, hs, cs, gates, tanh_cs = ctx.saved_tensors
        steps, batch, input_size = x.shape
        hidden = weight_hh.shape[1]
        two_h, three_h = 2 * hidden, 3 * hidden
        detach_h = ctx.detach_h or [False] * steps
        detach_c = ctx.detach_c or [False] * steps
        # The local derivatives are formed step by step inside the loop, while that step's
        # (B, 4H) block is in cache: vectorised over all T they cost more in memory traffic.
        local = torch.empty_like(gates)  # becomes d loss / d gate pre-activations
        one = gates.new_ones(())
        # Per-step views, each list made in one C++ call (see forward).
        gate_s, tanh_s, c_prev_s = gates.unbind(0), tanh_cs.unbind(0), cs[:-1].unbind(0)
        i_s, f_s = gates[..., :hidden].unbind(0), gates[..., hidden:two_h].unbind(0)
        g_s, o_s = gates[..., two_h:three_h].unbind(0), gates[..., three_h:].unbind(0)
        local_s = local.unbind(0)
        local_i, local_f = local[..., :hidden].unbind(0), local[..., hidden:two_h].unbind(0)
        local_g, local_o = local[..., two_h:three_h].unbind(0), local[..., three_h:].unbind(0)
        local_cell = local[..., :three_h].view(steps, batch, 3, hidden).unbind(0)
        grad_output_s = grad_output.unbind(0) if grad_output is not None else None
        dh = grad_h_n  # gradient reaching h_t from later steps (None = zero)
        dc = grad_c_n
        for t in range(steps - 1, -1, -1):
            gate, i, f, g, o, tanh_c = gate_s[t], i_s[t], f_s[t], g_s[t], o_s[t], tanh_s[t]
            dh_t = grad_output_s[t] if grad_output_s is not None else None
            if dh is not None:
                dh_t = dh if dh_t is None else dh_t + dh
            if dh_t is None:
                dh_t = tanh_c.new_zeros(batch, hidden)
            # dc_t = dc + dh_t * o * (1 - tanh(c_t)^2)
            dtanh = torch.addcmul(one, tanh_c, tanh_c, value=-1.0).mul_(o)
            dc_t = torch.addcmul(dc, dh_t, dtanh) if dc is not None else dh_t * dtanh
            # sigmoid' = s (1 - s) for i, f, o in one op; tanh' = 1 - g^2 for g.
            torch.addcmul(gate, gate, gate, value=-1.0, out=local_s[t])
            torch.addcmul(one, g, g, value=-1.0, out=local_g[t])
            local_i[t].mul_(g)  # d c / d i = g
            local_f[t].mul_(c_prev_s[t])  # d c / d f = c_{t-1}
            local_g[t].mul_(i)  # d c / d g = i
            local_o[t].mul_(tanh_c).mul_(dh_t)  # d h / d o = tanh(c_t), scaled by dh_t
            # i, f, g columns are scaled by dc_t: one broadcast multiply for the three.
            local_cell[t].mul_(dc_t.unsqueeze(1))
            # c-detach cuts c_{t-1} -> c_t; h-detach cuts h_{t-1} -> gates_t (GEMM skipped).
            dc = None if detach_c[t] else dc_t.mul_(f)
            dh = None if detach_h[t] else torch.mm(local_s[t], weight_hh)

        grad_gates = local.view(steps * batch, 4 * hidden)
        needs = ctx.needs_input_grad
        grad_x = grad_h0 = grad_c0 = None
        grad_w_ih = grad_w_hh = grad_bias = None
        if needs[0]:
            grad_x = torch.mm(grad_gates, weight_ih).view(steps, batch, input_size)
        if needs[1]:
            grad_h0 = dh if dh is not None else hs.new_zeros(batch, hidden)
        if needs[2]:
            grad_c0 = dc if dc is not None else cs.new_zeros(batch, hidden)
        # Weight gradients are not masked: W_hh still multiplies the (detached) h_{t-1}.
        if needs[3]:
            grad_w_ih = torch.mm(grad_gates.t(), x.reshape(steps * batch, input_size))
        if needs[4]:
            grad_w_hh = torch.mm(grad_gates.t(), hs[:-1].reshape(steps * batch, hidden))
        if needs[5] or needs[6]:
            grad_bias = grad_gates.sum(0)
        return (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_bias, None, None)


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
