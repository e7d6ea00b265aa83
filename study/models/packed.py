"""K independent h-detach LSTM classifiers stacked into one batched model (trial packing)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from study.models.classifier import SequenceClassifier
from study.models.device_lstm import device_lstm, keep_factors

# A member's parameters in SequenceClassifier order (its state_dict names).
MEMBER_NAMES = (
    "lstm.weight_ih_l0",
    "lstm.weight_hh_l0",
    "lstm.bias_ih_l0",
    "lstm.bias_hh_l0",
    "head.weight",
    "head.bias",
)
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


class Workspace:
    """The big per-step buffers of the CPU function, handed back after each backward.

    Fresh buffers of a pack's size (50 MB and more) come from mmap on every step (glibc returns
    them to the OS above its mmap threshold) and page-fault in as they are first written: a
    third of a packed step's time. A buffer is reused only once the backward that used it is
    done, so two forwards in flight never share one; an output of a forward stays valid until
    the next forward after its backward.
    """

    def __init__(self) -> None:
        self.free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}

    def take(self, members: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        free = self.free.get(((members, *shape), like.dtype))
        return free.pop() if free else aligned_blocks(members, shape, like)

    def give(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            self.free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)


class _PackedCPUFunction(torch.autograd.Function):
    """The CPU masked BPTT of DetachLSTM, op for op, over K members stacked member-major.

    Each member's numbers are bit-identical to its solo run. Its GEMMs are the solo run's calls
    on operands at the solo run's alignment (`aligned_blocks`: MKL's results can depend on it)
    and its sigmoids run on exactly the solo run's tensors (vectorised and scalar-tail exp differ
    in the last bit); the other elementwise ops run once over all members, as they give the same
    bits whichever SIMD lane an element lands in. tests/test_packed.py pins this down.
    Layout: x (K, T, B, I), weights (K, 4H, ...).
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
        hs = workspace.take(members, (steps + 1, batch, hidden), x)  # hs[:, t] = h_{t-1}
        cs = workspace.take(members, (steps + 1, batch, hidden), x)
        tanh_cs = workspace.take(members, (steps, batch, hidden), x)
        hs[:, 0].zero_()
        cs[:, 0].zero_()
        two_h, three_h = 2 * hidden, 3 * hidden
        # Same tanh-as-sigmoid trick and folded biases as DetachLSTM's CPU forward.
        gate_scale = x.new_ones(4 * hidden, 1)
        gate_scale[two_h:three_h] = 2.0
        scaled_hh = aligned_blocks(members, (4 * hidden, hidden), x)
        weight_hh_t = torch.mul(weight_hh, gate_scale, out=scaled_hh).transpose(1, 2)
        scaled_ih = aligned_blocks(members, (4 * hidden, input_size), x)
        weight_ih_t = torch.mul(weight_ih, gate_scale, out=scaled_ih).transpose(1, 2)
        bias = (bias_ih + bias_hh) * gate_scale.squeeze(1)
        gates = workspace.take(members, (steps, batch, 4 * hidden), x)
        inputs = x.view(members, steps * batch, input_size)
        for k in range(members):
            torch.addmm(bias[k], inputs[k], weight_ih_t[k], out=gates[k].view(steps * batch, -1))
        one, minus_one = x.new_ones(()), -x.new_ones(())
        # Per-step views, each list made in one C++ call (as DetachLSTM does): (K, B, .) views
        # for the ops over all members, (B, .) views for the per-member GEMMs and sigmoids.
        step_views = zip(
            gates[..., :hidden].unbind(1),
            gates[..., hidden:two_h].unbind(1),
            gates[..., two_h:three_h].unbind(1),
            gates[..., three_h:].unbind(1),
            hs[:, 1:].unbind(1),
            cs[:, :-1].unbind(1),
            cs[:, 1:].unbind(1),
            tanh_cs.unbind(1),
            strict=True,
        )
        member_gates = [gates[k].unbind(0) for k in range(members)]
        member_h = [hs[k, :-1].unbind(0) for k in range(members)]
        member_tanh = [tanh_cs[k].unbind(0) for k in range(members)]
        for t, (i, f, g, o, h_next, c_prev, c_next, tanh_c) in enumerate(step_views):
            for k in range(members):
                member_gates[k][t].addmm_(member_h[k][t], weight_hh_t[k]).sigmoid_()
            torch.addcmul(minus_one, g, one, value=2.0, out=g)  # g = 2 sigmoid(2z) - 1
            torch.mul(f, c_prev, out=c_next)
            c_next.addcmul_(i, g)
            torch.mul(c_next, 2.0, out=tanh_c)
            for k in range(members):
                member_tanh[k][t].sigmoid_()
            torch.addcmul(minus_one, tanh_c, one, value=2.0, out=tanh_c)
            torch.mul(o, tanh_c, out=h_next)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight_ih, weight_hh, hs, cs, gates, tanh_cs)
        ctx.detach_h = detach_h
        ctx.detach_c = detach_c
        ctx.workspace = workspace
        return hs[:, 1:], hs[:, steps], cs[:, steps]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_output: torch.Tensor | None,
        grad_h_n: torch.Tensor | None,
        grad_c_n: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight_ih, weight_hh, hs, cs, gates, tanh_cs = ctx.saved_tensors
        members, steps, batch, input_size = x.shape
        hidden = weight_hh.shape[2]
        two_h, three_h = 2 * hidden, 3 * hidden
        local = ctx.workspace.take(members, tuple(gates.shape[1:]), gates)
        one = gates.new_ones(())
        gate_s, tanh_s, c_prev_s = gates.unbind(1), tanh_cs.unbind(1), cs[:, :-1].unbind(1)
        i_s, f_s = gates[..., :hidden].unbind(1), gates[..., hidden:two_h].unbind(1)
        g_s, o_s = gates[..., two_h:three_h].unbind(1), gates[..., three_h:].unbind(1)
        local_s = local.unbind(1)
        local_i, local_f = local[..., :hidden].unbind(1), local[..., hidden:two_h].unbind(1)
        local_g, local_o = local[..., two_h:three_h].unbind(1), local[..., three_h:].unbind(1)
        local_cell = local[..., :three_h].view(members, steps, batch, 3, hidden).unbind(1)
        member_local = [local[k].unbind(0) for k in range(members)]
        grad_output_s = grad_output.unbind(1) if grad_output is not None else None
        never = [False] * members
        cut_h = list(zip(*ctx.detach_h, strict=True)) if ctx.detach_h else [never] * steps
        cut_c = list(zip(*ctx.detach_c, strict=True)) if ctx.detach_c else [never] * steps
        dh, dc = grad_h_n, grad_c_n
        for t in range(steps - 1, -1, -1):
            gate, i, f, g, o, tanh_c = gate_s[t], i_s[t], f_s[t], g_s[t], o_s[t], tanh_s[t]
            dh_t = grad_output_s[t] if grad_output_s is not None else None
            if dh is not None:
                dh_t = dh if dh_t is None else dh_t + dh
            if dh_t is None:
                dh_t = tanh_c.new_zeros(members, batch, hidden)
            dtanh = torch.addcmul(one, tanh_c, tanh_c, value=-1.0).mul_(o)
            dc_t = torch.addcmul(dc, dh_t, dtanh) if dc is not None else dh_t * dtanh
            torch.addcmul(gate, gate, gate, value=-1.0, out=local_s[t])
            torch.addcmul(one, g, g, value=-1.0, out=local_g[t])
            local_i[t].mul_(g)
            local_f[t].mul_(c_prev_s[t])
            local_g[t].mul_(i)
            local_o[t].mul_(tanh_c).mul_(dh_t)
            local_cell[t].mul_(dc_t.unsqueeze(2))
            # A member that detaches at t gets a zero gradient where its solo run gets none:
            # x + 0 == x, so the sums that follow are unchanged bit for bit.
            if all(cut_c[t]):
                dc = None
            else:
                dc = dc_t.mul_(f)
                for k in range(members):
                    if cut_c[t][k]:
                        dc[k].zero_()
            if all(cut_h[t]):
                dh = None
            else:
                dh = aligned_blocks(members, (batch, hidden), x)
                for k in range(members):
                    if cut_h[t][k]:
                        dh[k].zero_()
                    else:
                        torch.mm(member_local[k][t], weight_hh[k], out=dh[k])

        grad_gates = local.view(members, steps * batch, 4 * hidden)
        needs = ctx.needs_input_grad
        grad_x = grad_w_ih = grad_w_hh = grad_bias = None
        # The weight GEMMs per member, exactly the solo run's calls (fresh outputs: an out=
        # argument makes mm copy the transposed (TB, 4H) operand first). Batched, the
        # (4H, TB) x (TB, 1) input-weight product would also miss MKL's GEMV path.
        inputs = x.view(members, steps * batch, input_size)
        previous = hs[:, :-1].reshape(members, steps * batch, hidden)
        if needs[0]:
            grad_x = torch.stack([torch.mm(grad_gates[k], weight_ih[k]) for k in range(members)])
            grad_x = grad_x.view(members, steps, batch, input_size)
        if needs[1]:
            grad_w_ih = torch.stack(
                [torch.mm(g.t(), i) for g, i in zip(grad_gates, inputs, strict=True)]
            )
        if needs[2]:
            grad_w_hh = torch.stack(
                [torch.mm(g.t(), h) for g, h in zip(grad_gates, previous, strict=True)]
            )
        if needs[3] or needs[4]:
            # Column sums per member: a batched reduction may add in another order.
            grad_bias = torch.stack([grad_gates[k].sum(0) for k in range(members)])
        ctx.workspace.give(hs, cs, tanh_cs, gates, local)
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
    (K, T', B, C), T' = T for readout "all" and 1 for "last".
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
        readout: str = "all",
    ) -> torch.Tensor:
        weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias = self.views()
        if x.is_cuda if self.device_path is None else self.device_path:
            members, steps, batch, _ = x.shape
            state = x.new_zeros(members, batch, self.hidden_size)
            output, h_n, _ = device_lstm(
                x.transpose(0, 1),
                state,
                state,
                (weight_ih, weight_hh, bias_ih, bias_hh),
                keep_factors(detach_h, steps, members, x),
                keep_factors(detach_c, steps, members, x),
            )
            if readout == "last":
                logits = torch.baddbmm(head_bias.unsqueeze(1), h_n, head_weight.transpose(1, 2))
                return logits.unsqueeze(1)
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
        if readout == "last":
            features = [h.unsqueeze(0) for h in h_n.unbind(0)]
        else:
            features = list(output.unbind(0))
        logits = [
            F.linear(feature, head_weight[k], head_bias[k]) for k, feature in enumerate(features)
        ]
        return torch.stack(logits)
