"""DeviceMaskedLSTM: masked BPTT for K stacked LSTMs, one fused cell per time step, masks on the
device; with the projections and weight gradients the Triton kernels (triton_lstm) share."""

from __future__ import annotations

import torch


def _cell_forward(
    input_gates: torch.Tensor, hidden_gates: torch.Tensor, cx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM cell step from pre-activations: (h_t, c_t, activated gates i|f|g|o).

    On CUDA this is PyTorch's fused LSTM-cell kernel (one launch); elsewhere the same arithmetic
    in plain ops, so the recursion around it can be tested on a CPU.
    """
    if input_gates.is_cuda:
        return torch.ops.aten._thnn_fused_lstm_cell(input_gates, hidden_gates, cx)
    gates = input_gates + hidden_gates
    hidden = cx.shape[1]
    i, f, g, o = gates.split(hidden, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    return hy, cy, torch.cat([i, f, g, o], dim=1)


def _cell_backward(
    grad_hy: torch.Tensor,
    grad_cy: torch.Tensor | None,
    cx: torch.Tensor,
    cy: torch.Tensor,
    workspace: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one cell step: (d loss / d gate pre-activations, d loss / d c_{t-1})."""
    if grad_hy.is_cuda:
        grad_gates, grad_cx, _ = torch.ops.aten._thnn_fused_lstm_cell_backward_impl(
            grad_hy, grad_cy, cx, cy, workspace, False
        )
        return grad_gates, grad_cx
    hidden = cx.shape[1]
    i, f, g, o = workspace.split(hidden, dim=1)
    tanh_c = cy.tanh()
    dc = grad_hy * o * (1 - tanh_c * tanh_c)
    if grad_cy is not None:
        dc = dc + grad_cy
    grad_i = dc * g * i * (1 - i)
    grad_f = dc * cx * f * (1 - f)
    grad_g = dc * i * (1 - g * g)
    grad_o = grad_hy * tanh_c * o * (1 - o)
    return torch.cat([grad_i, grad_f, grad_g, grad_o], dim=1), dc * f


def input_projections(
    x: torch.Tensor, weight_ih: torch.Tensor, bias_ih: torch.Tensor, bias_hh: torch.Tensor
) -> torch.Tensor:
    """All input projections at once, both biases folded in: (T, K, B, 4H), contiguous."""
    bias = (bias_ih + bias_hh).unsqueeze(1)  # (K, 1, 4H)
    if x.shape[-1] == 1:
        return torch.addcmul(bias, x, weight_ih.transpose(1, 2)).contiguous()
    return torch.matmul(x, weight_ih.transpose(1, 2)).add_(bias).contiguous()


def parameter_grads(
    needs: tuple[bool, ...],
    gates: torch.Tensor,
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    all_h: torch.Tensor,
    grad_h0: torch.Tensor | None,
    grad_c0: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of every DeviceMaskedLSTM input from the gate gradients gates (T, K, B, 4H)."""
    grad_x = grad_w_ih = grad_w_hh = grad_bias = None
    if needs[0]:
        grad_x = torch.matmul(gates, weight_ih)
    # Weight gradients are not masked: W_hh still multiplies the (detached) h_{t-1}.
    if needs[3]:
        grad_w_ih = torch.einsum("tkbg,tkbi->kgi", gates, x)
    if needs[4]:
        grad_w_hh = torch.einsum("tkbg,tkbh->kgh", gates, all_h[:-1])
    if needs[5] or needs[6]:
        grad_bias = gates.sum(dim=(0, 2))
    grad_h0 = grad_h0 if needs[1] else None
    grad_c0 = grad_c0 if needs[2] else None
    return (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_bias, None, None)


class DeviceMaskedLSTM(torch.autograd.Function):
    """K independent LSTMs over one sequence; masks are (T, K) "keep" factors on the device.

    h-detach only changes gradients (paper Sec. 4), so the forward is a plain LSTM and the masks
    act in the backward: `keep_h[t, k]` multiplies the gradient that reaches h_{t-1} through
    gates_t (0 = detached), `keep_c[t, k]` the gradient through c_{t-1} -> c_t. Multiplying
    instead of branching keeps every step's kernels the same, so there is no host sync and the
    whole step can be captured in a CUDA graph. Layout is time-major: x (T, K, B, I),
    weights (K, 4H, I) / (K, 4H, H), biases (K, 4H), state (K, B, H).
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
        keep_h: torch.Tensor | None,
        keep_c: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.contiguous()  # time-major in memory, so the projections below are too
        steps, members, batch, _ = x.shape
        rows = members * batch
        gates_x = input_projections(x, weight_ih, bias_ih, bias_hh)
        weight_hh_t = weight_hh.transpose(1, 2)
        hs, cs, workspaces = [h0], [c0], []
        for t in range(steps):
            # One batched GEMM and one fused cell kernel per step.
            gates_h = torch.bmm(hs[t], weight_hh_t)
            hy, cy, workspace = _cell_forward(
                gates_x[t].view(rows, -1), gates_h.view(rows, -1), cs[t].reshape(rows, -1)
            )
            hs.append(hy.view(members, batch, -1))
            cs.append(cy.view(members, batch, -1))
            workspaces.append(workspace)
        all_h = torch.stack(hs)  # (T+1, K, B, H): all_h[t] = h_{t-1}
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight_ih, weight_hh, all_h, keep_h, keep_c)
        # c_n is an output: on ctx itself it would close a reference cycle (node -> ctx -> c_n ->
        # node) that keeps the graph, and with it the parameters' AccumulateGrad nodes and their
        # recorded stream, alive until Python's cycle collector runs. A later CUDA-graph capture
        # on another stream then meets a stale default-stream AccumulateGrad and is invalidated.
        ctx.cs = [*cs[:-1], cs[steps].detach()]
        ctx.workspaces = workspaces
        return all_h[1:], all_h[steps], cs[steps]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_output: torch.Tensor | None,
        grad_h_n: torch.Tensor | None,
        grad_c_n: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        return DeviceMaskedLSTM.eager_backward(
            ctx.needs_input_grad,
            ctx.saved_tensors,
            ctx.cs,
            ctx.workspaces,
            (grad_output, grad_h_n, grad_c_n),
        )

    @staticmethod
    def eager_backward(
        needs: tuple[bool, ...],
        saved: tuple[torch.Tensor | None, ...],
        cs: list[torch.Tensor],
        workspaces: list[torch.Tensor],
        grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    ) -> tuple[torch.Tensor | None, ...]:
        """The backward step loop from the forward's state: saved = (x, weight_ih, weight_hh,
        all_h, keep_h, keep_c), cs = [c_0 .. c_T], workspaces = each step's i|f|g|o."""
        x, weight_ih, weight_hh, all_h, keep_h, keep_c = saved
        grad_output, grad_h_n, grad_c_n = grads
        steps, members, batch, _ = x.shape
        rows = members * batch
        if grad_output is not None:
            grad_output = grad_output.contiguous()
        grad_hy = grad_h_n
        if grad_output is not None:
            grad_hy = grad_output[-1] if grad_hy is None else grad_output[-1] + grad_hy
        if grad_hy is None:
            grad_hy = all_h.new_zeros(members, batch, all_h.shape[-1])
        grad_cy = grad_c_n
        masked_weights = None
        if keep_h is not None:  # (T, K, 4H, H): keep_h[t, k] * W_hh[k], exact for keep in {0, 1}
            masked_weights = (keep_h.view(steps, members, 1, 1) * weight_hh).unbind(0)
        grad_gates: list[torch.Tensor] = [all_h] * steps  # placeholders, all overwritten
        for t in range(steps - 1, -1, -1):
            flat_grad_cy = None if grad_cy is None else grad_cy.reshape(rows, -1)
            gate_grad, grad_cx = _cell_backward(
                grad_hy.reshape(rows, -1),
                flat_grad_cy,
                cs[t].reshape(rows, -1),
                cs[t + 1].reshape(rows, -1),
                workspaces[t],
            )
            grad_gates[t] = gate_grad
            if t == 0 and not (needs[1] or needs[2]):
                break
            gate_grad = gate_grad.view(members, batch, -1)
            below = grad_output[t - 1] if grad_output is not None and t > 0 else None
            # h-detach: the gradient into h_{t-1} through gates_t is scaled by keep_h[t]; with
            # W_hh pre-scaled per step that is one (b)addbmm, like the unmasked case.
            weight = weight_hh if masked_weights is None else masked_weights[t]
            if below is None:
                grad_hy = torch.bmm(gate_grad, weight)
            else:
                grad_hy = torch.baddbmm(below, gate_grad, weight)
            # c-detach: the gradient through c_{t-1} -> c_t is scaled by keep_c[t].
            grad_cy = grad_cx.view(members, batch, -1)
            if keep_c is not None:
                grad_cy = grad_cy.mul_(keep_c[t].view(members, 1, 1))
        gates = torch.stack(grad_gates).view(steps, members, batch, -1)  # (T, K, B, 4H)
        if grad_cy is None and needs[2]:
            grad_cy = torch.zeros_like(cs[0])
        return parameter_grads(needs, gates, x, weight_ih, all_h, grad_hy, grad_cy)
