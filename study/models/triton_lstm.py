"""Persistent Triton kernels for DeviceMaskedLSTM: the whole time loop in one launch each way."""

from __future__ import annotations

import os

import torch

from study.models import triton_split
from study.models.notices import say_once
from study.models.step_lstm import DeviceMaskedLSTM, input_projections, parameter_grads
from study.switches import switch

try:  # here and in triton_split.py only; CPU-only installs may not have triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

# Environment switches (allowed values and defaults: study/switches.py). HDETACH_TRITON=0 runs
# the eager per-step CUDA path instead; the others tune one run (benchmark sweeps).
ENV_SWITCH, ENV_PRECISION = "HDETACH_TRITON", "HDETACH_TRITON_PRECISION"
ENV_BLOCK_B, ENV_WARPS = "HDETACH_TRITON_BLOCK_B", "HDETACH_TRITON_WARPS"
# Which kernels: the hidden-split ones (study/models/triton_split.py) split the time loop over
# hidden units with a barrier per step and need every program resident at once, so they serve
# one trial, or a pack at more batch rows a program (ENV_SPLIT_ROWS) up to one that fills the
# GPU: "auto" (or "split") takes them where they fit; "rows" gives each program batch rows
# for the whole sequence. Measured on an H100 at pixel MNIST, tf32: split
# 5.1 ms per forward + backward, rows 14.2 (benchmarks/results/h100.txt).
ENV_KERNEL, ENV_SPLIT_WARPS = "HDETACH_TRITON_KERNEL", "HDETACH_TRITON_SPLIT_WARPS"
ENV_SPLIT_UNITS = "HDETACH_TRITON_SPLIT_UNITS"  # hidden units per split program
ENV_SPLIT_SYNC = "HDETACH_TRITON_SPLIT_SYNC"  # barrier or tagged (triton_split.exchange)
ENV_SPLIT_BACKWARD = "HDETACH_TRITON_SPLIT_BACKWARD"  # gates or partials (triton_split.backward)
# Batch rows per split program: auto takes pack_layout.choose_layout's (16 rows where a trial's
# programs fit beside the pack's others, else wider: a whole pack resident at once).
ENV_SPLIT_ROWS = "HDETACH_TRITON_SPLIT_ROWS"
# Reduction slice of the full-fp32 products (see _product_from_memory).
ENV_IEEE_SLICE = "HDETACH_TRITON_IEEE_SLICE"
# The kernels each forward ran ("split", "rows"), for benchmarks to label what they timed.
used: set[str] = set()
MAX_HIDDEN = 256
# The hidden axis is held as one or two register tiles of at most CHUNK columns: a 256 x 256
# fp32 weight tile would not fit the shared memory a tl.dot operand passes through.
CHUNK = 128
_failed: set[tuple] = set()


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _padded(hidden: int) -> int:
    return max(16, triton.next_power_of_2(hidden))


def tuning(hidden: int) -> tuple[int, int]:
    """(BLOCK_B, num_warps) for a hidden size; env overrides for benchmark sweeps.

    Batch rows are independent, so each program owns BLOCK_B rows of one member for the whole
    sequence. 16 is tl.dot's smallest M and gives the most programs (B=100, K=1: 7), hence the
    shortest chain of dependent per-step work; 8 warps share a 128-wide tile's dot and loads.
    """
    warps = switch(ENV_WARPS)
    if warps == "auto":
        warps = "8" if _padded(hidden) >= 128 else "4"
    return int(switch(ENV_BLOCK_B)), int(warps)


def precision() -> str:
    """tl.dot precision: "tf32" only where torch allows TF32 for fp32 matmuls, else "ieee".

    torch.backends.cuda.matmul.allow_tf32 is False by default, so the kernels match the eager
    path to float tolerance; cuDNN's nn.LSTM, by contrast, uses TF32 by default
    (torch.backends.cudnn.allow_tf32), which is why the benchmark also prints a TF32 row.
    HDETACH_TRITON_PRECISION=ieee|tf32|tf32x3 overrides this for one run (tf32x3: three TF32
    products per product, close to fp32 on tensor cores; for benchmark comparisons).
    """
    forced = switch(ENV_PRECISION)
    if forced != "auto":
        return forced
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _split_layout(
    x: torch.Tensor, members: int, batch: int, hidden: int
) -> triton_split.Layout | None:
    """The hidden-split kernels' layout where they run (see ENV_KERNEL, ENV_SPLIT_ROWS), else
    None; never in the interpreter, which runs programs one after another, so a barrier across
    programs would never open; nor once they failed in this configuration (the row kernels
    take over)."""
    if switch(ENV_KERNEL) == "rows" or interpreting() or not x.is_cuda:
        return None
    rows = switch(ENV_SPLIT_ROWS)
    layout = triton_split.launch_layout(
        members,
        batch,
        hidden,
        triton_split.multiprocessors(x.device),
        _split_units(),
        None if rows == "auto" else int(rows),
        precision(),
        switch(ENV_SPLIT_SYNC),
    )
    if layout is None or (_failed and _split_key(hidden, layout.rows) in _failed):
        return None
    return layout


def _split_warps(backward: bool, rows: int = triton_split.BLOCK_ROWS) -> int:
    warps = switch(ENV_SPLIT_WARPS)
    if warps != "auto":
        return int(warps)
    handoff = _split_handoff(rows) if backward else None
    return triton_split.default_warps(precision(), switch(ENV_SPLIT_SYNC), handoff, rows)


def _split_handoff(rows: int) -> str:
    """The backward's handoff: the switch's at 16 rows, the partial sums wider."""
    return triton_split.backward_handoff(rows, switch(ENV_SPLIT_BACKWARD))


def _split_units() -> int:
    return int(switch(ENV_SPLIT_UNITS))


def _key(hidden: int) -> tuple:
    """The row kernels' configuration, as _failed remembers it."""
    return (_padded(hidden), *tuning(hidden), precision())


def _split_key(hidden: int, rows: int = triton_split.BLOCK_ROWS) -> tuple:
    """The split kernels' configuration, as _failed remembers it, rows included: a launch
    whose chosen layout failed takes the row kernels (choose_layout picks the same layout
    again); other shapes' layouts, and a forced HDETACH_TRITON_SPLIT_ROWS, are still tried."""
    launch = (switch(ENV_SPLIT_SYNC), _split_handoff(rows), _split_units(), rows)
    return (
        "split",
        _padded(hidden),
        *launch,
        _split_warps(False, rows),
        _split_warps(True, rows),
        precision(),
    )


def supports(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> bool:
    """Whether these inputs can take the Triton path (else the eager per-step path runs)."""
    if triton is None or switch(ENV_SWITCH) == "0":
        return False
    if not (x.is_cuda or interpreting()):
        return False
    tensors = (x, h0, c0, *weights)
    if any(t.dtype != torch.float32 for t in tensors):
        return False
    hidden = h0.shape[-1]
    if hidden > MAX_HIDDEN or _key(hidden) in _failed:
        return False
    if precision() == "ieee" and switch(ENV_PRECISION) != "ieee":
        # Full-fp32 tl.dot in the rows kernels spills registers: measured on an H100 they are
        # 2.5-3.4x slower than the per-step path, so fp32 runs Triton only where the split
        # kernels fit (as fast as the per-step path or faster; for a pack, at up to 32 rows a
        # program: pack_layout.WIDEST_ROWS); larger packs take the per-step path.
        return _split_layout(x, x.shape[1], x.shape[2], hidden) is not None
    return True


def _row_tiles(hidden: int, block_b: int) -> dict[str, int | bool]:
    """The row kernels' tile sizes: h in one or two register tiles of HC <= CHUNK columns."""
    padded = _padded(hidden)
    return {
        "H": hidden,
        "HP": padded,
        "HC": min(padded, CHUNK),
        "TWO": padded > CHUNK,
        "BLOCK_B": block_b,
        "KCH": int(switch(ENV_IEEE_SLICE)),
    }


def _give_up(hidden: int, error: Exception, split: triton_split.Layout | None) -> None:
    """Remember a failed configuration and say once that the eager path takes over (for this
    call; after a split kernel's failure in layout `split`, later calls take the row kernels
    or another layout)."""
    if split is not None:
        _failed.add(_split_key(hidden, split.rows))
        path = "the eager CUDA path for this step, then the row kernels"
        message = f"Triton split LSTM kernel failed, using {path}: {error!r}"
    else:
        _failed.add(_key(hidden))
        message = f"Triton LSTM kernel failed, using the eager CUDA path: {error!r}"
    say_once(message, warn=True)


class TritonMaskedLSTM(torch.autograd.Function):
    """DeviceMaskedLSTM's math, layout and API, with the time loop in one kernel each way.

    Forward saves h_t and c_t for every step and the activated gates (written over the input
    projections, which the backward does not need); the backward kernel walks t = T-1..0 with
    dh, dc in registers and writes every step's gate gradients, from which the (unmasked)
    weight gradients are GEMMs as in the eager path. If a kernel fails to compile, the eager
    path takes over, said once.
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
        x = x.contiguous()
        steps, members, batch, _ = x.shape
        hidden = h0.shape[-1]
        gates = input_projections(x, weight_ih, bias_ih, bias_hh)  # (T, K, B, 4H), becomes i|f|g|o
        all_h = x.new_empty(steps + 1, members, batch, hidden)  # all_h[t] = h_{t-1}
        all_c = x.new_empty(steps + 1, members, batch, hidden)
        # (K, H, 4H): the forward's weight tile rows are contiguous (coalesced loads).
        weight_hh_t = weight_hh.transpose(1, 2).contiguous()
        block_b, warps = tuning(hidden)
        prec = precision()
        ctx.split = _split_layout(x, members, batch, hidden)
        used.add("rows" if ctx.split is None else "split")
        try:
            if ctx.split is not None:
                all_h[0].copy_(h0)
                all_c[0].copy_(c0)
                triton_split.forward(
                    gates,
                    weight_hh.contiguous(),
                    all_h,
                    all_c,
                    prec,
                    _split_warps(False, ctx.split.rows),
                    ctx.split,
                    switch(ENV_SPLIT_SYNC),
                )
            else:
                _forward_kernel[(members, triton.cdiv(batch, block_b))](
                    gates,
                    weight_hh_t,
                    h0.contiguous(),
                    c0.contiguous(),
                    all_h,
                    all_c,
                    steps,
                    members * batch * hidden,
                    members * batch * 4 * hidden,
                    batch,
                    **_row_tiles(hidden, block_b),
                    PRECISION=prec,
                    num_warps=warps,
                    num_stages=1,  # nothing to pipeline: each step depends on the last
                )
        except Exception as error:  # compile failure: the eager path gives the same results
            _give_up(hidden, error, ctx.split)
            ctx.eager = True
            return DeviceMaskedLSTM.forward(
                ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, keep_h, keep_c
            )
        ctx.eager = False
        ctx.precision = prec
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight_ih, weight_hh, all_h, all_c, gates, keep_h, keep_c)
        return all_h[1:], all_h[steps], all_c[steps]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_output: torch.Tensor | None,
        grad_h_n: torch.Tensor | None,
        grad_c_n: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        if ctx.eager:
            return DeviceMaskedLSTM.backward(ctx, grad_output, grad_h_n, grad_c_n)
        x, weight_ih, weight_hh, all_h, all_c, gates, keep_h, keep_c = ctx.saved_tensors
        steps, members, batch, _ = x.shape
        hidden = all_h.shape[-1]
        grad_gates = torch.empty_like(gates)
        grad_h0 = all_h.new_empty(members, batch, hidden)
        grad_c0 = torch.empty_like(grad_h0)
        block_b, warps = tuning(hidden)
        grads = (grad_output, grad_h_n, grad_c_n)
        outputs = (grad_gates, grad_h0, grad_c0)
        try:
            if ctx.split is not None:
                triton_split.backward(
                    gates,
                    all_c,
                    weight_hh,
                    grads,
                    (keep_h, keep_c),
                    outputs,
                    ctx.precision,
                    _split_warps(True, ctx.split.rows),
                    ctx.split,
                    switch(ENV_SPLIT_SYNC),
                    _split_handoff(ctx.split.rows),
                )
            else:
                _backward_kernel[(members, triton.cdiv(batch, block_b))](
                    *triton_split.backward_operands(
                        gates, all_c, weight_hh, grads, (keep_h, keep_c), outputs
                    ),
                    steps,
                    members,
                    members * batch * hidden,
                    members * batch * 4 * hidden,
                    batch,
                    **_row_tiles(hidden, block_b),
                    HAS_GRAD_OUT=grad_output is not None,
                    HAS_GRAD_H=grad_h_n is not None,
                    HAS_GRAD_C=grad_c_n is not None,
                    HAS_KEEP_H=keep_h is not None,
                    HAS_KEEP_C=keep_c is not None,
                    PRECISION=ctx.precision,
                    num_warps=warps,
                    num_stages=1,
                )
        except Exception as error:  # compile failure: the eager step loop on the saved state
            _give_up(hidden, error, ctx.split)
            rows = members * batch
            workspaces = [g.view(rows, -1) for g in gates.unbind(0)]
            return DeviceMaskedLSTM.eager_backward(
                ctx.needs_input_grad,
                (x, weight_ih, weight_hh, all_h, keep_h, keep_c),
                list(all_c.unbind(0)),
                workspaces,
                (grad_output, grad_h_n, grad_c_n),
            )
        return parameter_grads(
            ctx.needs_input_grad, grad_gates, x, weight_ih, all_h, grad_h0, grad_c0
        )


def triton_lstm(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    keep_h: torch.Tensor | None,
    keep_c: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply TritonMaskedLSTM (same arguments as device_lstm; callers check supports())."""
    return TritonMaskedLSTM.apply(x, h0, c0, *weights, keep_h, keep_c)


if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh from the sigmoid (in every Triton version and the interpreter); the cancellation
        # near 0 costs ~1e-7 absolute, below fp32 training noise.
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _weight_tile(ptr, row_stride, row0, col0, rows_left, cols_left, HC: tl.constexpr):
        """ptr[(row0 + r) * row_stride + col0 + c] for an HC x HC tile, 0 outside the matrix."""
        r = tl.arange(0, HC)
        mask = (r[:, None] < rows_left) & (r[None, :] < cols_left)
        offsets = (row0 + r)[:, None] * row_stride + col0 + r[None, :]
        return tl.load(ptr + offsets, mask=mask, other=0.0)

    @triton.jit
    def _product_from_memory(
        acc,
        a_ptr,
        a_rows,
        row_ok,
        a_stride,
        a_col0,
        w_ptr,
        w_stride,
        w_row0,
        w_col0,
        w_cols_left,
        H,
        HP: tl.constexpr,
        HC: tl.constexpr,
        KCH: tl.constexpr,
    ):
        """acc + A[:, a_col0:+H] @ W[w_row0:+H, w_col0:+HC], A read back from global memory.

        Full-fp32 ("ieee") tl.dot runs on FMA units and holds each thread's operands for the
        whole reduction in registers: with 128-long reductions ptxas spills tens of KB per
        thread. Reading the just-stored operand back in KCH-wide slices keeps it small.
        """
        r = tl.arange(0, KCH)
        c = tl.arange(0, HC)
        for k0 in tl.static_range(0, HP, KCH):
            k_ok = k0 + r < H
            a_offsets = a_rows[:, None] * a_stride + a_col0 + k0 + r[None, :]
            a = tl.load(a_ptr + a_offsets, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_offsets = (w_row0 + k0 + r)[:, None] * w_stride + w_col0 + c[None, :]
            w_mask = k_ok[:, None] & (c < w_cols_left)[None, :]
            w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        return acc

    @triton.jit
    def _gate(
        h_a,
        h_b,
        step,
        mask,
        q: tl.constexpr,
        jc: tl.constexpr,
        HC: tl.constexpr,
        TWO: tl.constexpr,
        PRECISION: tl.constexpr,
        HP: tl.constexpr,
        KCH: tl.constexpr,
    ):
        """Pre-activation of gate q, column chunk jc: gates_x + h_{t-1} @ W_hh^T (w_ptr: W^T).

        step: the step's operands (gx_ptr, w_ptr, offsets, H, h_prev_ptr, rows, row_ok). TF32
        products use h_{t-1} in registers; full fp32 reads it back from all_h (stored by the
        previous step, before a block barrier) in slices.
        """
        gx_ptr, w_ptr, offsets, H, h_prev_ptr, rows, row_ok = step
        col0 = q * H + jc * HC
        gx = tl.load(gx_ptr + offsets + col0, mask=mask, other=0.0)
        if PRECISION == "ieee":
            zeros = tl.zeros(gx.shape, tl.float32)
            product = _product_from_memory(
                zeros,
                h_prev_ptr,
                rows,
                row_ok,
                H,
                0,
                w_ptr,
                4 * H,
                0,
                col0,
                H - jc * HC,
                H,
                HP,
                HC,
                KCH,
            )
            acc = gx + product
        else:
            w = _weight_tile(w_ptr, 4 * H, 0, col0, H, H - jc * HC, HC)
            acc = tl.dot(h_a, w, gx, input_precision=PRECISION)
            if TWO:
                w = _weight_tile(w_ptr, 4 * H, HC, col0, H - HC, H - jc * HC, HC)
                acc = tl.dot(h_b, w, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _cell(
        h_a,
        h_b,
        c,
        step,
        mask,
        jc: tl.constexpr,
        HC: tl.constexpr,
        TWO: tl.constexpr,
        PRECISION: tl.constexpr,
        HP: tl.constexpr,
        KCH: tl.constexpr,
    ):
        """One step for column chunk jc: stores i|f|g|o over gates_x, returns (h_t, c_t)."""
        i = tl.sigmoid(_gate(h_a, h_b, step, mask, 0, jc, HC, TWO, PRECISION, HP, KCH))
        f = tl.sigmoid(_gate(h_a, h_b, step, mask, 1, jc, HC, TWO, PRECISION, HP, KCH))
        g = _tanh(_gate(h_a, h_b, step, mask, 2, jc, HC, TWO, PRECISION, HP, KCH))
        o = tl.sigmoid(_gate(h_a, h_b, step, mask, 3, jc, HC, TWO, PRECISION, HP, KCH))
        c = f * c + i * g
        h = o * _tanh(c)
        gx_ptr, offsets, H = step[0], step[2], step[3]
        col0 = jc * HC
        tl.store(gx_ptr + offsets + col0, i, mask=mask)
        tl.store(gx_ptr + offsets + col0 + H, f, mask=mask)
        tl.store(gx_ptr + offsets + col0 + 2 * H, g, mask=mask)
        tl.store(gx_ptr + offsets + col0 + 3 * H, o, mask=mask)
        return h, c

    @triton.jit
    def _forward_kernel(
        gates_ptr,
        w_t_ptr,
        h0_ptr,
        c0_ptr,
        all_h_ptr,
        all_c_ptr,
        T,
        step_state,
        step_gates,
        B,
        H: tl.constexpr,
        HP: tl.constexpr,
        HC: tl.constexpr,
        TWO: tl.constexpr,
        BLOCK_B: tl.constexpr,
        KCH: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Grid (K, cdiv(B, BLOCK_B)): BLOCK_B rows of member k through all T steps.

        h and c stay in registers (one HC-wide tile, or two when H > CHUNK); W_hh^T is read
        from L2 every step (4 H x H fp32 tiles are too large to keep in registers).
        """
        k = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, HC)
        row_ok = rows < B
        member_rows = k * B + rows
        mask_a = row_ok[:, None] & (cols < H)[None, :]
        mask_b = row_ok[:, None] & (cols + HC < H)[None, :]
        state = (k * B + rows)[:, None] * H + cols[None, :]  # within one (K, B, H) step
        gate = (k * B + rows)[:, None] * (4 * H) + cols[None, :]  # within one (K, B, 4H) step
        w_ptr = w_t_ptr + k * (H * 4 * H)
        h_a = tl.load(h0_ptr + state, mask=mask_a, other=0.0)
        c_a = tl.load(c0_ptr + state, mask=mask_a, other=0.0)
        tl.store(all_h_ptr + state, h_a, mask=mask_a)
        tl.store(all_c_ptr + state, c_a, mask=mask_a)
        h_b = tl.zeros((BLOCK_B, HC), tl.float32)
        c_b = tl.zeros((BLOCK_B, HC), tl.float32)
        if TWO:
            h_b = tl.load(h0_ptr + state + HC, mask=mask_b, other=0.0)
            c_b = tl.load(c0_ptr + state + HC, mask=mask_b, other=0.0)
            tl.store(all_h_ptr + state + HC, h_b, mask=mask_b)
            tl.store(all_c_ptr + state + HC, c_b, mask=mask_b)
        if PRECISION == "ieee":
            tl.debug_barrier()  # h_0 in all_h is read back by other threads of this block
        gx_ptr = gates_ptr
        h_ptr = all_h_ptr + step_state
        c_ptr = all_c_ptr + step_state
        for _ in range(T):
            h_prev_ptr = h_ptr - step_state
            step = (gx_ptr, w_ptr, gate, H, h_prev_ptr, member_rows, row_ok)
            new_h_a, c_a = _cell(h_a, h_b, c_a, step, mask_a, 0, HC, TWO, PRECISION, HP, KCH)
            tl.store(h_ptr + state, new_h_a, mask=mask_a)
            tl.store(c_ptr + state, c_a, mask=mask_a)
            if TWO:
                h_b, c_b = _cell(h_a, h_b, c_b, step, mask_b, 1, HC, TWO, PRECISION, HP, KCH)
                tl.store(h_ptr + state + HC, h_b, mask=mask_b)
                tl.store(c_ptr + state + HC, c_b, mask=mask_b)
            h_a = new_h_a
            if PRECISION == "ieee":
                tl.debug_barrier()  # h_t stored: visible to the block's threads next step
            # Pointers advance by one step each iteration: t * stride could overflow int32.
            gx_ptr += step_gates
            h_ptr += step_state
            c_ptr += step_state

    @triton.jit
    def _gate_grads(
        dh,
        dc,
        gx_ptr,
        c_ptr,
        step_state,
        offsets,
        state,
        mask,
        jc: tl.constexpr,
        H,
        HC: tl.constexpr,
    ):
        """Step t's gate gradients for column chunk jc (stored), and dc_t * f for c_{t-1}."""
        col0 = jc * HC
        i = tl.load(gx_ptr + offsets + col0, mask=mask, other=0.0)
        f = tl.load(gx_ptr + offsets + col0 + H, mask=mask, other=0.0)
        g = tl.load(gx_ptr + offsets + col0 + 2 * H, mask=mask, other=0.0)
        o = tl.load(gx_ptr + offsets + col0 + 3 * H, mask=mask, other=0.0)
        c = tl.load(c_ptr + state + col0, mask=mask, other=0.0)
        c_prev = tl.load(c_ptr - step_state + state + col0, mask=mask, other=0.0)
        tanh_c = _tanh(c)
        dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
        di = dc * g * i * (1.0 - i)
        df = dc * c_prev * f * (1.0 - f)
        dg = dc * i * (1.0 - g * g)
        do = dh * tanh_c * o * (1.0 - o)
        return di, df, dg, do, dc * f

    @triton.jit
    def _store_gate_grads(
        ptr, offsets, mask, di, df, dg, do, jc: tl.constexpr, H, HC: tl.constexpr
    ):
        col0 = jc * HC
        tl.store(ptr + offsets + col0, di, mask=mask)
        tl.store(ptr + offsets + col0 + H, df, mask=mask)
        tl.store(ptr + offsets + col0 + 2 * H, dg, mask=mask)
        tl.store(ptr + offsets + col0 + 3 * H, do, mask=mask)

    @triton.jit
    def _recurrent_grad(
        acc,
        di,
        df,
        dg,
        do,
        w_ptr,
        jc: tl.constexpr,
        kc: tl.constexpr,
        H,
        HC: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """acc + dgates (chunk jc) @ W_hh (rows of chunk jc, columns of chunk kc), all 4 gates."""
        rows_left = H - jc * HC
        cols_left = H - kc * HC
        w = _weight_tile(w_ptr, H, jc * HC, kc * HC, rows_left, cols_left, HC)
        acc = tl.dot(di, w, acc, input_precision=PRECISION)
        w = _weight_tile(w_ptr, H, H + jc * HC, kc * HC, rows_left, cols_left, HC)
        acc = tl.dot(df, w, acc, input_precision=PRECISION)
        w = _weight_tile(w_ptr, H, 2 * H + jc * HC, kc * HC, rows_left, cols_left, HC)
        acc = tl.dot(dg, w, acc, input_precision=PRECISION)
        w = _weight_tile(w_ptr, H, 3 * H + jc * HC, kc * HC, rows_left, cols_left, HC)
        return tl.dot(do, w, acc, input_precision=PRECISION)

    @triton.jit
    def _backward_kernel(
        gates_ptr,
        c_last_ptr,
        w_hh_ptr,
        grad_out_ptr,
        grad_h_ptr,
        grad_c_ptr,
        keep_h_ptr,
        keep_c_ptr,
        dgates_ptr,
        dh0_ptr,
        dc0_ptr,
        T,
        K,
        step_state,
        step_gates,
        B,
        H: tl.constexpr,
        HP: tl.constexpr,
        HC: tl.constexpr,
        TWO: tl.constexpr,
        BLOCK_B: tl.constexpr,
        KCH: tl.constexpr,
        HAS_GRAD_OUT: tl.constexpr,
        HAS_GRAD_H: tl.constexpr,
        HAS_GRAD_C: tl.constexpr,
        HAS_KEEP_H: tl.constexpr,
        HAS_KEEP_C: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Grid as the forward; walks t = T-1..0 with dh, dc in registers.

        Pointer arguments point at step T-1 (c_last_ptr at c_{T-1}, gates_ptr at step T-1's
        activated gates, keep at row T-1) and move back one step per iteration.
        """
        k = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, HC)
        row_ok = rows < B
        member_rows = k * B + rows
        mask_a = row_ok[:, None] & (cols < H)[None, :]
        mask_b = row_ok[:, None] & (cols + HC < H)[None, :]
        state = (k * B + rows)[:, None] * H + cols[None, :]
        gate = (k * B + rows)[:, None] * (4 * H) + cols[None, :]
        w_ptr = w_hh_ptr + k * (4 * H * H)
        dh_a = tl.zeros((BLOCK_B, HC), tl.float32)
        dc_a = tl.zeros((BLOCK_B, HC), tl.float32)
        dh_b = tl.zeros((BLOCK_B, HC), tl.float32)
        dc_b = tl.zeros((BLOCK_B, HC), tl.float32)
        if HAS_GRAD_H:
            dh_a = tl.load(grad_h_ptr + state, mask=mask_a, other=0.0)
            if TWO:
                dh_b = tl.load(grad_h_ptr + state + HC, mask=mask_b, other=0.0)
        if HAS_GRAD_C:
            dc_a = tl.load(grad_c_ptr + state, mask=mask_a, other=0.0)
            if TWO:
                dc_b = tl.load(grad_c_ptr + state + HC, mask=mask_b, other=0.0)
        gx_ptr = gates_ptr
        dg_ptr = dgates_ptr
        c_ptr = c_last_ptr
        go_ptr = grad_out_ptr
        kh_ptr = keep_h_ptr + k
        kc_ptr = keep_c_ptr + k
        for _ in range(T):
            if HAS_GRAD_OUT:
                dh_a += tl.load(go_ptr + state, mask=mask_a, other=0.0)
                if TWO:
                    dh_b += tl.load(go_ptr + state + HC, mask=mask_b, other=0.0)
            di_a, df_a, dg_a, do_a, dc_a = _gate_grads(
                dh_a, dc_a, gx_ptr, c_ptr, step_state, gate, state, mask_a, 0, H, HC
            )
            _store_gate_grads(dg_ptr, gate, mask_a, di_a, df_a, dg_a, do_a, 0, H, HC)
            if TWO:
                di_b, df_b, dg_b, do_b, dc_b = _gate_grads(
                    dh_b, dc_b, gx_ptr, c_ptr, step_state, gate, state, mask_b, 1, H, HC
                )
                _store_gate_grads(dg_ptr, gate, mask_b, di_b, df_b, dg_b, do_b, 1, H, HC)
            # dh_{t-1} = dgates_t @ W_hh, in column chunks of h.
            if PRECISION == "ieee":
                tl.debug_barrier()  # dgates_t stored: read back by the block's threads
                dh_a = tl.zeros((BLOCK_B, HC), tl.float32)
                dh_b = tl.zeros((BLOCK_B, HC), tl.float32)
                for q in tl.static_range(4):
                    dh_a = _product_from_memory(
                        dh_a,
                        dg_ptr,
                        member_rows,
                        row_ok,
                        4 * H,
                        q * H,
                        w_ptr,
                        H,
                        q * H,
                        0,
                        H,
                        H,
                        HP,
                        HC,
                        KCH,
                    )
                    if TWO:
                        dh_b = _product_from_memory(
                            dh_b,
                            dg_ptr,
                            member_rows,
                            row_ok,
                            4 * H,
                            q * H,
                            w_ptr,
                            H,
                            q * H,
                            HC,
                            H - HC,
                            H,
                            HP,
                            HC,
                            KCH,
                        )
            else:
                zeros = tl.zeros((BLOCK_B, HC), tl.float32)
                dh_a = _recurrent_grad(
                    zeros, di_a, df_a, dg_a, do_a, w_ptr, 0, 0, H, HC, PRECISION
                )
                if TWO:
                    dh_a = _recurrent_grad(
                        dh_a, di_b, df_b, dg_b, do_b, w_ptr, 1, 0, H, HC, PRECISION
                    )
                    dh_b = _recurrent_grad(
                        zeros, di_a, df_a, dg_a, do_a, w_ptr, 0, 1, H, HC, PRECISION
                    )
                    dh_b = _recurrent_grad(
                        dh_b, di_b, df_b, dg_b, do_b, w_ptr, 1, 1, H, HC, PRECISION
                    )
            # h-detach: the gradient reaching h_{t-1} through gates_t is scaled by keep_h[t];
            # c-detach: the one through c_{t-1} -> c_t by keep_c[t] (weight grads unmasked).
            if HAS_KEEP_H:
                keep = tl.load(kh_ptr)
                dh_a = dh_a * keep
                dh_b = dh_b * keep
            if HAS_KEEP_C:
                keep = tl.load(kc_ptr)
                dc_a = dc_a * keep
                dc_b = dc_b * keep
            gx_ptr -= step_gates
            dg_ptr -= step_gates
            c_ptr -= step_state
            go_ptr -= step_state
            kh_ptr -= K
            kc_ptr -= K
        tl.store(dh0_ptr + state, dh_a, mask=mask_a)
        tl.store(dc0_ptr + state, dc_a, mask=mask_a)
        if TWO:
            tl.store(dh0_ptr + state + HC, dh_b, mask=mask_b)
            tl.store(dc0_ptr + state + HC, dc_b, mask=mask_b)
