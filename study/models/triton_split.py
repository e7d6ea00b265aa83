"""Persistent Triton LSTM kernels split over hidden units, exchanging each step (a trial's
programs among themselves, so a pack's trials step side by side: study/pack_layout.py)."""

from __future__ import annotations

import torch

from study import pack_layout
from study.pack_layout import Layout, choose_layout, widest_rows

try:  # triton_lstm.py decides whether these kernels run; this module only holds them
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

# Rows and hidden units per program (study/pack_layout.py chooses the rows per launch). tl.dot
# needs 16 in every dimension. Fewer units per program means more programs at each step's
# barrier, but a shorter product for each.
BLOCK_ROWS = 16
BLOCK_UNITS = 16
NARROW = Layout(BLOCK_ROWS, BLOCK_UNITS)  # one trial's layout: the most programs per trial
MAX_HIDDEN = pack_layout.MAX_HIDDEN  # the whole h row tile (rows x 128) is one tl.dot operand


# Warps per program at the wide layouts (rows > 16, 16 units; their backward always takes the
# partial sums: see backward_handoff()), by (rows, tl.dot precision, exchange, kernel): the 16-row
# choice (default_warps, measured fastest there) where it holds the program without spilling,
# else the fewest warps that do. No GPU has timed these yet. Registers per thread / spilled
# bytes per thread, compiled for an H100 (sm_90, Triton 3.8, ptxas and cuobjdump of its wheel:
# benchmarks/kernel_sass.py stats), H = 100 and H = 128, at 4 | 8 | 16 warps:
#   32 tf32 barrier forward     168/0 127/0  | 124/0 124/0 * | 60/0 56/0
#   64 tf32 barrier forward     255/112 255/88 | 198/0 206/0 * | 107/0 113/0
#  128 tf32 barrier forward     255/1176 255/1336 | 255/88 255/88 | 128/0 123/0 *
#   32 tf32 tagged forward      142/0 194/0  | 164/0 176/0 * | 76/0 74/0
#   64 tf32 tagged forward      255/32 255/488 | 253/0 253/0 * | 128/0 122/0
#   32 ieee barrier forward     255/720 255/696 | 255/24 255/0 * | 128/208 128/168
#   32 tf32 barrier backward    162/0 164/0 * | 120/0 120/0 | 64/0 64/0
#   64 tf32 barrier backward    255/0 255/8  | 201/0 201/0 * | 108/0 108/0
#  128 tf32 barrier backward    255/1632 255/1680 | 255/0 255/0 * | 128/48 128/48
#   32 tf32 tagged backward     190/0 198/0 * | 151/0 155/0 | 80/0 82/0
#   64 tf32 tagged backward     255/416 255/440 | 242/0 255/0 * | 122/0 115/0
#   32 ieee barrier backward    255/560 255/336 | 32/3528 32/3528 | 64/0 64/0 *
# tf32x3 (three TF32 products, a benchmark option) takes tf32's warps: 32 rows, barrier: the
# forward 255/8, the backward 4 warps; 64 rows, tagged: 255/0 both (8 warps). Wider, and the
# layouts missing here, spill at every warps (pack_layout.WIDEST_ROWS).
WIDE_WARPS: dict[tuple[int, str, str, str], int] = {
    (32, "tf32", "barrier", "forward"): 8,
    (64, "tf32", "barrier", "forward"): 8,
    (128, "tf32", "barrier", "forward"): 16,
    (32, "tf32", "tagged", "forward"): 8,
    (64, "tf32", "tagged", "forward"): 8,
    (32, "ieee", "barrier", "forward"): 8,
    (32, "tf32", "barrier", "backward"): 4,
    (64, "tf32", "barrier", "backward"): 8,
    (128, "tf32", "barrier", "backward"): 8,
    (32, "tf32", "tagged", "backward"): 4,
    (64, "tf32", "tagged", "backward"): 8,
    (32, "ieee", "barrier", "backward"): 16,
}


def backward_handoff(rows: int, asked: str) -> str:
    """The backward's handoff at a layout: the one asked for (HDETACH_TRITON_SPLIT_BACKWARD) at
    16 rows; wider, the partial sums, whose gather grows with rows x 16 x blocks words, where
    the gates' grows with 4 x rows x H: its (4, rows, HP) tl.dot operand takes 160 KiB of shared
    memory at 64 rows (spilling 592 bytes a thread at the best warps) and 288 KiB at 128 (more
    than an SM has), and with the tagged exchange it spills at 32 rows already (616 bytes)."""
    return asked if rows <= BLOCK_ROWS else "partials"


def default_warps(
    precision: str, sync: str, handoff: str | None = None, rows: int = BLOCK_ROWS
) -> int:
    """Warps per program of the forward (handoff None) or the backward, as measured on an H100
    (pixel MNIST, benchmarks/results/h100.txt: gpu_check.sh's sweep, whose forward is the same
    kernel whatever the backward's handoff). Forward: 8 (tf32, barrier: 1.86 ms, 1.99 at 4; a
    tagged reader holds 16 x 128 words: at 8 warps its loop runs 321 instructions, at 4, 547),
    except full fp32 with the barrier: 4 (the first H100 sweep, before the tf32 one-product
    change: 15.1 ms per forward + backward at 4 warps, 19.4 at 8). Backward: 4 (tf32, barrier,
    gates: 3.29 ms, 3.78 at 8), except where 4 spill registers (compiled for an H100 by
    tests/test_triton_lstm.py under Triton 3.8 and 3.6, the GPU machine's): full fp32 with the
    tagged exchange or the partial sums, and the tf32 tagged backward with gates, whose reader
    holds 4 x 16 x 128 int64 words while it polls (64 a thread at 4 warps; partial sums: 14).
    Wider rows: WIDE_WARPS (a layout missing there spills at any warps: 16, the most)."""
    if rows > BLOCK_ROWS:
        dot = "ieee" if precision == "ieee" else "tf32"
        kernel = "forward" if handoff is None else "backward"
        return WIDE_WARPS.get((rows, dot, sync, kernel), 16)
    if handoff is None:
        return 8 if sync == "tagged" or precision != "ieee" else 4
    if precision == "ieee":
        return 8 if sync == "tagged" or handoff == "partials" else 4
    return 8 if sync == "tagged" and handoff == "gates" else 4


def grid(members: int, batch: int, hidden: int, layout: Layout = NARROW) -> tuple[int, int, int]:
    """(unit blocks, row blocks, members): unit blocks vary fastest, so the programs that wait
    for each other at every step's barrier are launched together."""
    return (triton.cdiv(hidden, layout.units), triton.cdiv(batch, layout.rows), members)


def multiprocessors(device: torch.device) -> int:
    """The GPU's SMs: each can hold one split program (the most any launch may have)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_layout(
    members: int,
    batch: int,
    hidden: int,
    sms: int,
    units: int = BLOCK_UNITS,
    rows: int | None = None,
    precision: str = "tf32",
    sync: str = "barrier",
) -> Layout | None:
    """The layout these kernels launch with, or None where no layout keeps every program
    resident at once (one per SM at the least): programs spin at a barrier on the others of
    their row block, so none may wait to be scheduled. (That holds while this process has the
    GPU to itself or time-sliced, not under CUDA MPS, where another process's kernels may hold
    SMs: there HDETACH_TRITON_KERNEL=rows.) `rows`: rows per program forced (a benchmark
    sweep: any that fits, spilling or not), else pack_layout.choose_layout's: the most programs
    per trial that fit, up to the widest rows that compile without spilling for this precision
    and exchange (16 rows for 32 units, whose wide layouts nobody has compiled yet). `sms`:
    the GPU's multiprocessors (multiprocessors())."""
    if rows is None:
        max_rows = widest_rows(precision, sync) if units == BLOCK_UNITS else BLOCK_ROWS
        return choose_layout(members, batch, hidden, sms, units, max_rows)
    forced = Layout(rows, units)
    fit = hidden <= MAX_HIDDEN and members * forced.programs(batch, hidden) <= sms
    return forced if fit else None


def fits(
    members: int, batch: int, hidden: int, device: torch.device, units: int = BLOCK_UNITS
) -> bool:
    """Whether some layout keeps every program resident at once (see launch_layout())."""
    return launch_layout(members, batch, hidden, multiprocessors(device), units) is not None


def exchange(
    members: int, row_blocks: int, ring_step: int, sync: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(barrier counters, ring) for one launch; what `sync` does not use is a stub, never read.

    "barrier": each program stores its part of step t, then arrives at its row block's counter;
    the others wait there, then load (a fence, the arrival, the wait's read, then the load: about
    four trips to L2 per step). "tagged": each value goes out as one 64-bit word holding the
    value and its step number (single-copy atomic), into a ring of two steps; readers reload
    until every word they need carries the step they want (about two trips, no fence). Two
    steps suffice: a program writes step t + 1 over step t - 1 only after reading everyone's
    step t, which each wrote after it had read step t - 1. Zeroed: no word has step 0's tag 1.

    `ring_step`: the words one step exchanges. A barrier's values go through the kernel's
    outputs, except where ring_step > 0 (the backward's partial sums, which no output keeps):
    then a float32 ring of two steps, safe for the same reason (a program overwrites step t - 1
    after waiting at step t, by which time everyone has read step t - 1 and arrived).
    """
    stub = torch.empty(1, dtype=torch.int32, device=device)
    if sync == "tagged":
        return stub, torch.zeros(2 * ring_step, dtype=torch.int64, device=device)
    arrivals = torch.zeros(members * row_blocks, dtype=torch.int32, device=device)
    ring = torch.empty(2 * ring_step, dtype=torch.float32, device=device) if ring_step else stub
    return arrivals, ring


def forward(
    gates: torch.Tensor,
    weight_hh: torch.Tensor,
    all_h: torch.Tensor,
    all_c: torch.Tensor,
    precision: str,
    warps: int,
    layout: Layout = NARROW,
    sync: str = "barrier",
) -> None:
    """Fill all_h[1:], all_c[1:] (all_h[0], all_c[0] hold h0, c0) and turn `gates` (T, K, B, 4H)
    from pre-activations (input part) into the activated i|f|g|o. `sync`: see exchange()."""
    steps, members, batch, four_h = gates.shape
    hidden = four_h // 4
    launch = grid(members, batch, hidden, layout)
    ring_step = members * batch * hidden if sync == "tagged" else 0
    arrivals, ring = exchange(members, launch[1], ring_step, sync, gates.device)
    _forward_kernel[launch](
        gates,
        weight_hh,
        all_h,
        all_c,
        arrivals,
        ring,
        steps,
        batch,
        members * batch * hidden,
        members * batch * four_h,
        H=hidden,
        HP=max(16, triton.next_power_of_2(hidden)),
        BB=layout.rows,
        HB=layout.units,
        PRECISION=precision,
        ONE_PRODUCT=precision != "ieee",
        TAGGED=sync == "tagged",
        num_warps=warps,
        num_stages=1,
    )


def backward_operands(
    gates: torch.Tensor,
    all_c: torch.Tensor,
    weight_hh: torch.Tensor,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    keeps: tuple[torch.Tensor | None, torch.Tensor | None],
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """The tensor arguments of both backward kernels (these and triton_lstm's row kernels), in
    their order: per-step tensors at step T-1, which the kernels walk back by pointer decrements
    (t * stride could overflow int32). An absent gradient or mask is never read: any pointer."""
    grad_output, grad_h_n, grad_c_n = grads
    keep_h, keep_c = keeps
    grad_gates, grad_h0, grad_c0 = outputs

    def last(tensor: torch.Tensor | None) -> torch.Tensor:
        return grad_gates[-1] if tensor is None else tensor.contiguous()[-1]

    def whole(tensor: torch.Tensor | None) -> torch.Tensor:
        return grad_gates if tensor is None else tensor.contiguous()

    return (
        last(gates),
        all_c[-1],
        weight_hh.contiguous(),
        last(grad_output),
        whole(grad_h_n),
        whole(grad_c_n),
        last(keep_h),
        last(keep_c),
        grad_gates[-1],
        grad_h0,
        grad_c0,
    )


def backward(
    gates: torch.Tensor,
    all_c: torch.Tensor,
    weight_hh: torch.Tensor,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    keeps: tuple[torch.Tensor | None, torch.Tensor | None],
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    precision: str,
    warps: int,
    layout: Layout = NARROW,
    sync: str = "barrier",
    handoff: str = "gates",
) -> None:
    """Masked BPTT: grads = (output, h_n, c_n) gradients or None, keeps = (keep_h, keep_c) of
    shape (T, K) or None; writes outputs = (gate gradients (T, K, B, 4H), grad h0, grad c0).

    dh_{t-1} = dgates_t @ W_hh needs every unit block's gate gradients. `handoff` "gates": each
    program gathers all of them (4 x 16 x H words a step) and multiplies by its columns of W_hh;
    "partials": each multiplies its own by its rows of W_hh, a partial sum over the whole h row,
    and gathers the other blocks' partials of its own columns (blocks x 16 x 16 words: 4.6x
    fewer at H = 100, read after the exchange; the product moves before it). Wider than 16
    rows, always the partial sums (backward_handoff), added one block's tile at a time."""
    grad_output, grad_h_n, grad_c_n = grads
    keep_h, keep_c = keeps
    steps, members, batch, four_h = gates.shape
    hidden = four_h // 4
    launch = grid(members, batch, hidden, layout)
    partials = backward_handoff(layout.rows, handoff) == "partials"
    padded = max(16, triton.next_power_of_2(hidden))
    blockwise = layout.rows > BLOCK_ROWS
    if blockwise:  # (K, unit blocks, row blocks x rows, HP): see the kernel
        ring_step = members * launch[0] * launch[1] * layout.rows * padded
    elif partials:  # (K, unit blocks, B, H) a step, in a ring in both exchanges
        ring_step = members * launch[0] * batch * hidden
    else:  # the tagged ring carries the gate gradients; the barrier's readers load the output
        ring_step = members * batch * four_h if sync == "tagged" else 0
    arrivals, ring = exchange(members, launch[1], ring_step, sync, gates.device)
    _backward_kernel[launch](
        *backward_operands(gates, all_c, weight_hh, grads, keeps, outputs),
        arrivals,
        ring,
        steps,
        members,
        batch,
        members * batch * hidden,
        members * batch * four_h,
        ring_step,
        H=hidden,
        HP=padded,
        BB=layout.rows,
        HB=layout.units,
        UBP=triton.next_power_of_2(launch[0]),
        HAS_GRAD_OUT=grad_output is not None,
        HAS_GRAD_H=grad_h_n is not None,
        HAS_GRAD_C=grad_c_n is not None,
        HAS_KEEP_H=keep_h is not None,
        HAS_KEEP_C=keep_c is not None,
        PRECISION=precision,
        TAGGED=sync == "tagged",
        PARTIALS=partials,
        BLOCKWISE=blockwise,
        num_warps=warps,
        num_stages=1,
    )


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _arrive(counter):
        """This program's arrival at the step's barrier (release at GPU scope, as a grid sync
        does): every store of the whole program comes before it."""
        tl.debug_barrier()
        tl.atomic_add(counter, 1, sem="release", scope="gpu")

    @triton.jit
    def _wait(counter, target):
        """Until all programs sharing `counter` have arrived: `target` = programs * steps.
        Triton turns the adds of 0 into acquire loads by one thread, shared through the CTA."""
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _publish(ptr, value, tag, mask):
        """Store fp32 `value` as 64-bit words: `tag` (int64) in the high half, its bits below."""
        bits = value.to(tl.uint32, bitcast=True).to(tl.int64)
        tl.store(ptr, bits | (tag << 32), mask=mask, cache_modifier=".cg")

    @triton.jit
    def _collect(ptr, mask, tag):
        """The fp32 values at `ptr` once every word there carries `tag` (reloaded from L2 until
        then: volatile loads). Masked-off words count as ready and read as 0."""
        ready = tl.full((), 1 << 62, tl.int64)  # a tag no step reaches, and value bits 0
        words = tl.load(ptr, mask=mask, other=ready, volatile=True)
        while tl.min((words >> 32).to(tl.int32)) < tag:
            words = tl.load(ptr, mask=mask, other=ready, volatile=True)
        return words.to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _program_tile(arrivals_ptr, B, H: tl.constexpr, BB: tl.constexpr, HB: tl.constexpr):
        """This program's place: its unit block and member k, its batch rows and hidden units
        (cols), the (rows, cols) tile's offsets in a (K, B, H) step and their mask, and its row
        block's barrier counter."""
        units, row_block, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = row_block * BB + tl.arange(0, BB)
        cols = units * HB + tl.arange(0, HB)
        own_ok = (rows < B)[:, None] & (cols < H)[None, :]
        own = (k * B + rows[:, None]) * H + cols[None, :]
        counter = arrivals_ptr + k * tl.num_programs(1) + row_block
        return units, k, rows, cols, own, own_ok, counter

    @triton.jit
    def _gates_of(x, BB: tl.constexpr, HB: tl.constexpr):
        """(BB, 4 HB) with the gate innermost (column 4 j + q) -> the (BB, HB) gates i, f, g, o."""
        pairs = tl.reshape(x, (BB, HB, 2, 2))  # [.., a, b]: gate q = 2 a + b
        even, odd = tl.split(pairs)  # b = 0: gates 0 and 2; b = 1: gates 1 and 3
        i, g = tl.split(even)
        f, o = tl.split(odd)
        return i, f, g, o

    @triton.jit
    def _joined(i, f, g, o, BB: tl.constexpr, HB: tl.constexpr):
        """The inverse of _gates_of."""
        return tl.reshape(tl.join(tl.join(i, g), tl.join(f, o)), (BB, 4 * HB))

    @triton.jit
    def _store_gates(dg_ptr, gate, d_i, d_f, d_g, d_o, mask, H):
        """A step's four (BB, HB) gate tiles (activations, gradients) of this program's units
        into a (T, K, B, 4H) output at one step (`gate`: their gate-0 offsets)."""
        tl.store(dg_ptr + gate, d_i, mask=mask)
        tl.store(dg_ptr + gate + H, d_f, mask=mask)
        tl.store(dg_ptr + gate + 2 * H, d_g, mask=mask)
        tl.store(dg_ptr + gate + 3 * H, d_o, mask=mask)

    @triton.jit
    def _load_gates(g_ptr, gate, mask, H):
        """A step's four (BB, HB) gate tiles of this program's units, as _store_gates wrote."""
        i = tl.load(g_ptr + gate, mask=mask, other=0.0)
        f = tl.load(g_ptr + gate + H, mask=mask, other=0.0)
        g = tl.load(g_ptr + gate + 2 * H, mask=mask, other=0.0)
        o = tl.load(g_ptr + gate + 3 * H, mask=mask, other=0.0)
        return i, f, g, o

    @triton.jit
    def _forward_kernel(
        gates_ptr,
        w_ptr,
        all_h_ptr,
        all_c_ptr,
        arrivals_ptr,
        ring_ptr,
        T,
        B,
        H_STEP,
        G_STEP,
        H: tl.constexpr,
        HP: tl.constexpr,
        BB: tl.constexpr,
        HB: tl.constexpr,
        PRECISION: tl.constexpr,
        ONE_PRODUCT: tl.constexpr,
        TAGGED: tl.constexpr,
    ):
        units, k, rows, cols, own, own_ok, counter = _program_tile(arrivals_ptr, B, H, BB, HB)
        inner = tl.arange(0, HP)
        # The four gates of this program's units side by side, gate innermost (column 4 j + q).
        gate_of = tl.arange(0, 4 * HB) % 4
        unit_of = units * HB + tl.arange(0, 4 * HB) // 4
        full_ok = (rows < B)[:, None] & (inner < H)[None, :]
        w = w_ptr + k * 4 * H * H
        if ONE_PRODUCT:
            # On tensor cores, one product h (BB, HP) @ W (HP, 4 HB) per step, whose
            # accumulators the warps share out, instead of four dependent (BB, HB) products
            # (SASS: 32 tensor-core ops per step on a chain of 16, not 128 on 64).
            # w_all[m, 4 j + q] = W_hh[q H + unit j, m]
            w_ok = (inner < H)[:, None] & (unit_of < H)[None, :]
            w_all = tl.load(
                w + (gate_of[None, :] * H + unit_of[None, :]) * H + inner[:, None],
                mask=w_ok,
                other=0.0,
            )
        else:
            # fp32 FMA products keep W in registers, where one (HP, 4 HB) tile would spill.
            # Tile q: w_q[m, j] = W_hh[q H + unit j, m].
            w_ok = (inner < H)[:, None] & (cols < H)[None, :]
            w_i = tl.load(w + (0 * H + cols[None, :]) * H + inner[:, None], mask=w_ok, other=0.0)
            w_f = tl.load(w + (1 * H + cols[None, :]) * H + inner[:, None], mask=w_ok, other=0.0)
            w_g = tl.load(w + (2 * H + cols[None, :]) * H + inner[:, None], mask=w_ok, other=0.0)
            w_o = tl.load(w + (3 * H + cols[None, :]) * H + inner[:, None], mask=w_ok, other=0.0)
        full = (k * B + rows[:, None]) * H + inner[None, :]
        # Gate q of the own units at (rows, cols): gate + q H. The input parts (z) come in and
        # the activations go out as four (BB, HB) tiles in the layout the cell update uses, so
        # neither passes through shared memory to change layout.
        gate = (k * B + rows[:, None]) * (4 * H) + cols[None, :]
        c = tl.load(all_c_ptr + own, mask=own_ok, other=0.0)
        h_ptr, c_ptr, g_ptr = all_h_ptr, all_c_ptr, gates_ptr
        z_i, z_f, z_g, z_o = _load_gates(g_ptr, gate, own_ok, H)  # input parts of step 0
        if TAGGED:  # h0 into ring slot 0, tagged 1 (step t reads slot t % 2, tag t + 1)
            h0 = tl.load(all_h_ptr + own, mask=own_ok, other=0.0)
            _publish(ring_ptr + own, h0, tl.full((), 1, tl.int64), own_ok)
        for t in range(T):
            # h_{t-1}, written by every program of this row block (.cg: not from a stale L1).
            if TAGGED:
                h = _collect(ring_ptr + (t % 2) * H_STEP + full, full_ok, t + 1)
            else:
                h = tl.load(h_ptr + full, mask=full_ok, other=0.0, cache_modifier=".cg")
            if ONE_PRODUCT:
                product = tl.dot(h, w_all, input_precision=PRECISION)
                p_i, p_f, p_g, p_o = _gates_of(product, BB, HB)
            else:
                p_i = tl.dot(h, w_i, input_precision=PRECISION)
                p_f = tl.dot(h, w_f, input_precision=PRECISION)
                p_g = tl.dot(h, w_g, input_precision=PRECISION)
                p_o = tl.dot(h, w_o, input_precision=PRECISION)
            i = tl.sigmoid(z_i + p_i)
            f = tl.sigmoid(z_f + p_f)
            g = _tanh(z_g + p_g)
            o = tl.sigmoid(z_o + p_o)
            c = f * c + i * g
            h_new = o * _tanh(c)
            h_ptr += H_STEP
            if TAGGED:
                tag = tl.cast(t + 2, tl.int64)
                _publish(ring_ptr + ((t + 1) % 2) * H_STEP + own, h_new, tag, own_ok)
            tl.store(h_ptr + own, h_new, mask=own_ok)
            if not TAGGED:
                _arrive(counter)
            # Only h_t is the other programs' business: the backward's operands (activations,
            # c_t) go out after it, so the arrival's fence does not wait for them.
            _store_gates(g_ptr, gate, i, f, g, o, own_ok, H)
            c_ptr += H_STEP
            g_ptr += G_STEP
            tl.store(c_ptr + own, c, mask=own_ok)
            # Step t+1's input part needs no other program: its load overlaps the wait.
            z_i, z_f, z_g, z_o = _load_gates(g_ptr, gate, own_ok & (t + 1 < T), H)
            if not TAGGED:
                _wait(counter, tl.num_programs(0) * (t + 1))

    @triton.jit
    def _step_inputs(
        act_ptr,
        c_ptr,
        grad_out_ptr,
        gate,
        own,
        mask,
        H,
        H_STEP,
        BB: tl.constexpr,
        HB: tl.constexpr,
        HAS_GRAD_OUT: tl.constexpr,
    ):
        """What the backward reads of step t (pointers at step t): the forward's activations
        i, f, g, o, then c_{t-1}, and the output gradient (zeros without one)."""
        i = tl.load(act_ptr + gate, mask=mask, other=0.0)
        f = tl.load(act_ptr + gate + H, mask=mask, other=0.0)
        g = tl.load(act_ptr + gate + 2 * H, mask=mask, other=0.0)
        o = tl.load(act_ptr + gate + 3 * H, mask=mask, other=0.0)
        c_prev = tl.load(c_ptr - H_STEP + own, mask=mask, other=0.0)
        d_out = tl.zeros((BB, HB), dtype=tl.float32)
        if HAS_GRAD_OUT:
            d_out = tl.load(grad_out_ptr + own, mask=mask, other=0.0)
        return i, f, g, o, c_prev, d_out

    @triton.jit
    def _backward_kernel(
        act_ptr,
        c_ptr,
        w_ptr,
        grad_out_ptr,
        grad_h_ptr,
        grad_c_ptr,
        keep_h_ptr,
        keep_c_ptr,
        dg_ptr,
        grad_h0_ptr,
        grad_c0_ptr,
        arrivals_ptr,
        ring_ptr,
        T,
        K,
        B,
        H_STEP,
        G_STEP,
        RING_STEP,
        H: tl.constexpr,
        HP: tl.constexpr,
        BB: tl.constexpr,
        HB: tl.constexpr,
        UBP: tl.constexpr,
        HAS_GRAD_OUT: tl.constexpr,
        HAS_GRAD_H: tl.constexpr,
        HAS_GRAD_C: tl.constexpr,
        HAS_KEEP_H: tl.constexpr,
        HAS_KEEP_C: tl.constexpr,
        PRECISION: tl.constexpr,
        TAGGED: tl.constexpr,
        PARTIALS: tl.constexpr,
        BLOCKWISE: tl.constexpr,
    ):
        units, k, rows, cols, own, own_ok, counter = _program_tile(arrivals_ptr, B, H, BB, HB)
        inner = tl.arange(0, HP)
        gate = (k * B + rows[:, None]) * (4 * H) + cols[None, :]
        if PARTIALS:
            # This program's rows of W_hh, gate innermost: w[4 j + q, m] = W_hh[q H + unit j, m],
            # so that (its gate gradients, joined) @ w is its share of dh_{t-1} for all m.
            four = tl.arange(0, 4 * HB)
            unit_of = units * HB + four // 4
            w_ok = (unit_of < H)[:, None] & (inner < H)[None, :]
            w = w_ptr + k * 4 * H * H + ((four % 4) * H + unit_of)[:, None] * H + inner[None, :]
            w = tl.load(w, mask=w_ok, other=0.0)
            # A ring step holds (K, unit blocks, B, H) partial sums: this program writes its
            # block's (rows, all m), then reads every block's (rows, own units) and sums them.
            block_count = tl.num_programs(0)
            if BLOCKWISE:
                # Wide rows: (K, unit blocks, row blocks x BB, HP), padded, so that the (BB, HP)
                # partial goes out unmasked: its mask, held across the loop, spilled (128 rows,
                # 16 warps: 168 bytes a thread, 48 without). Only rows < B, cols < H are read.
                padded = tl.num_programs(1) * BB
                mine = ((k * block_count + units) * padded + rows[:, None]) * HP + inner[None, :]
                mine_ok = None
                block_zero = (k * block_count * padded + rows[:, None]) * HP + cols[None, :]
            else:
                mine = ((k * block_count + units) * B + rows[:, None]) * H + inner[None, :]
                mine_ok = (rows < B)[:, None] & (inner < H)[None, :]
                blocks = tl.arange(0, UBP)
                theirs = (k * block_count + blocks[:, None, None]) * B + rows[None, :, None]
                theirs = theirs * H + cols[None, None, :]
                theirs_ok = (blocks < block_count)[:, None, None] & own_ok[None, :, :]
        else:
            gate_of = tl.arange(0, 4)[:, None, None]
            # dh_{t-1}[:, own] = sum over gates q of dgates_q (B, H) @ W_hh[q H : q H + H, own],
            # one batched product over q (a warp per gate) summed after, rather than four
            # chained products (the SASS: 32 tensor-core ops per step on a chain of 16, not 128
            # on 64).
            w_ok = (gate_of < 4) & (inner < H)[None, :, None] & (cols < H)[None, None, :]
            w = w_ptr + k * 4 * H * H + (gate_of * H + inner[None, :, None]) * H
            w = tl.load(w + cols[None, None, :], mask=w_ok, other=0.0)
            all_gates = (k * B + rows[None, :, None]) * (4 * H) + gate_of * H
            all_gates += inner[None, None, :]
            all_ok = (gate_of < 4) & (rows < B)[None, :, None] & (inner < H)[None, None, :]
        dh = tl.zeros((BB, HB), dtype=tl.float32)
        dc = tl.zeros((BB, HB), dtype=tl.float32)
        if HAS_GRAD_H:
            dh = tl.load(grad_h_ptr + own, mask=own_ok, other=0.0)
        if HAS_GRAD_C:
            dc = tl.load(grad_c_ptr + own, mask=own_ok, other=0.0)
        # Step T-1's inputs; inside the loop, step t-1's are loaded while the barrier waits.
        c_t = tl.load(c_ptr + own, mask=own_ok, other=0.0)
        i, f, g, o, c_prev, d_out = _step_inputs(
            act_ptr, c_ptr, grad_out_ptr, gate, own, own_ok, H, H_STEP, BB, HB, HAS_GRAD_OUT
        )
        for s in range(T):
            dh += d_out
            tanh_c = _tanh(c_t)
            dc += dh * o * (1.0 - tanh_c * tanh_c)
            d_i = dc * g * i * (1.0 - i)
            d_f = dc * c_prev * f * (1.0 - f)
            d_g = dc * i * (1.0 - g * g)
            d_o = dh * tanh_c * o * (1.0 - o)
            # What the other programs need of step s goes out first: ring slot s % 2, tag s + 1.
            slot, tag = ring_ptr + (s % 2) * RING_STEP, tl.cast(s + 1, tl.int64)
            if PARTIALS:
                joined = _joined(d_i, d_f, d_g, d_o, BB, HB)
                partial = tl.dot(joined, w, input_precision=PRECISION)
                if TAGGED:
                    _publish(slot + mine, partial, tag, mine_ok)
                else:
                    tl.store(slot + mine, partial, mask=mine_ok)
            elif TAGGED:
                _publish(slot + gate, d_i, tag, own_ok)
                _publish(slot + gate + H, d_f, tag, own_ok)
                _publish(slot + gate + 2 * H, d_g, tag, own_ok)
                _publish(slot + gate + 3 * H, d_o, tag, own_ok)
            if not (PARTIALS or TAGGED):  # the barrier's readers load them from the output
                _store_gates(dg_ptr, gate, d_i, d_f, d_g, d_o, own_ok, H)
            # c-detach scales the gradient through c_{t-1} -> c_t by keep_c[t]; h-detach scales
            # the gradient into h_{t-1} through gates_t by keep_h[t] (applied below).
            dc = dc * f
            if HAS_KEEP_C:
                dc = dc * tl.load(keep_c_ptr + k)
            keep_h = 1.0
            if HAS_KEEP_H:
                keep_h = tl.load(keep_h_ptr + k)
            if not TAGGED:
                _arrive(counter)
            if PARTIALS or TAGGED:  # for the weight gradients after the kernel only
                _store_gates(dg_ptr, gate, d_i, d_f, d_g, d_o, own_ok, H)
            act_ptr -= G_STEP
            c_ptr -= H_STEP
            grad_out_ptr -= H_STEP
            keep_h_ptr -= K
            keep_c_ptr -= K
            c_t = c_prev
            i, f, g, o, c_prev, d_out = _step_inputs(
                act_ptr, c_ptr, grad_out_ptr, gate, own, own_ok & (s + 1 < T), H, H_STEP, BB, HB,
                HAS_GRAD_OUT,
            )  # fmt: skip
            # Every program of the row block's share of step s.
            if not TAGGED:
                _wait(counter, tl.num_programs(0) * (s + 1))
            if PARTIALS and BLOCKWISE:
                # One (BB, HB) tile of partials per unit block, added as it comes: block b's
                # tile of this program's rows and units sits (k (blocks - 1) + b) B H words
                # past `own`, so no (blocks, BB, HB) offsets, masks and values stay live.
                dh = tl.zeros((BB, HB), dtype=tl.float32)
                for block in tl.static_range((H + HB - 1) // HB):  # every block: one mask
                    part = slot + block_zero + block * padded * HP
                    if TAGGED:
                        dh += _collect(part, own_ok, tag)
                    else:
                        dh += tl.load(part, mask=own_ok, other=0.0, cache_modifier=".cg")
                dh = dh * keep_h
            elif PARTIALS:
                if TAGGED:
                    parts = _collect(slot + theirs, theirs_ok, tag)
                else:
                    parts = tl.load(slot + theirs, mask=theirs_ok, other=0.0, cache_modifier=".cg")
                dh = tl.sum(parts, axis=0) * keep_h
            else:
                if TAGGED:
                    d_gates = _collect(slot + all_gates, all_ok, tag)
                else:
                    d_gates = tl.load(
                        dg_ptr + all_gates, mask=all_ok, other=0.0, cache_modifier=".cg"
                    )
                dh = tl.sum(tl.dot(d_gates, w, input_precision=PRECISION), axis=0) * keep_h
            dg_ptr -= G_STEP
        tl.store(grad_h0_ptr + own, dh, mask=own_ok)
        tl.store(grad_c0_ptr + own, dc, mask=own_ok)
