"""study/models/triton_split.py at the wide layouts (a pack's trials side by side, up to 128 rows a
program): the launch chosen, compiled for an H100, run in Triton's interpreter, and on a GPU.

The 16-row kernels' own tests (every exchange and handoff, one trial) are in
tests/test_triton_lstm.py, whose helpers these reuse.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="needs triton")

from test_triton_lstm import (  # noqa: E402 (after the skip: they import triton)
    CUDA,
    REPO,
    _compile_for_hopper,
    _inputs,
    _interpreter_errors,
    _local_memory_bytes,
    _max_error,
    _programs_as_threads,
    _Recorded,
    _run,
    _split_apply,
    _split_matches_eager,
)

from study import pack_layout  # noqa: E402
from study.models import notices, triton_lstm, triton_split  # noqa: E402
from study.models.step_lstm import DeviceMaskedLSTM  # noqa: E402
from study.pack_layout import Layout  # noqa: E402

H100_SMS = pack_layout.KNOWN_GPUS["h100"].sms
# The shared memory one H100 program may have (227 KiB, opted into: triton does).
H100_SHARED = 232448
SPILL_LIMIT = 128  # bytes a thread, as tests/test_triton_lstm.py allows the 16-row kernels


@pytest.fixture(autouse=True)
def _fresh_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in tests/test_triton_lstm.py: no fallback remembered from another test."""
    monkeypatch.setattr(notices, "_said", set())
    monkeypatch.setattr(triton_lstm, "_failed", set())
    monkeypatch.setattr(triton_lstm, "used", set())


# --- which launch --------------------------------------------------------------------------------


def test_one_trial_keeps_the_16_row_layout_and_a_full_pack_goes_wide() -> None:
    launch = triton_split.launch_layout
    assert launch(1, 100, 100, H100_SMS) == triton_split.NARROW
    assert launch(18, 100, 100, H100_SMS) == Layout(128, 16)
    assert launch(16, 100, 128, H100_SMS) == Layout(128, 16)
    assert launch(19, 100, 100, H100_SMS) is None  # more programs than SMs: the row kernels


def test_the_widest_rows_follow_precision_and_exchange() -> None:
    launch = triton_split.launch_layout
    # Full fp32 spills beyond 32 rows, the tagged exchange beyond 64.
    assert launch(18, 100, 100, H100_SMS, precision="ieee") is None
    assert launch(4, 100, 100, H100_SMS, precision="ieee") == Layout(32, 16)
    assert launch(18, 100, 100, H100_SMS, sync="tagged") is None
    assert launch(9, 100, 100, H100_SMS, sync="tagged") == Layout(64, 16)
    assert launch(2, 100, 100, H100_SMS, precision="ieee", sync="tagged") == Layout(16, 16)
    # 32 units a program: its wide layouts were never compiled, so 16 rows only.
    assert launch(1, 100, 100, H100_SMS, units=32) == Layout(16, 32)
    assert launch(5, 100, 100, H100_SMS, units=32) is None


def test_a_forced_layout_runs_where_it_fits() -> None:
    launch = triton_split.launch_layout
    assert launch(1, 100, 100, H100_SMS, rows=128) == Layout(128, 16)
    assert launch(18, 100, 100, H100_SMS, rows=128, precision="ieee") == Layout(128, 16)
    assert launch(3, 100, 100, H100_SMS, rows=16) is None  # 147 programs
    assert launch(1, 100, 256, H100_SMS, rows=128) is None


def test_wide_layouts_take_the_partial_sums_and_their_own_warps() -> None:
    assert triton_split.backward_handoff(16, "gates") == "gates"
    assert triton_split.backward_handoff(32, "gates") == "partials"
    assert triton_split.backward_handoff(128, "partials") == "partials"
    warps = triton_split.default_warps
    assert warps("tf32", "barrier", None, 128) == 16  # 8 spill 88 bytes a thread
    assert warps("tf32", "barrier", "gates", 128) == 8
    assert warps("tf32x3", "barrier", None, 64) == warps("tf32", "barrier", None, 64) == 8
    assert warps("ieee", "barrier", "partials", 32) == 16
    # The 16-row choices are those measured on an H100 (tests/test_switches.py).
    assert warps("tf32", "barrier", None) == 8 and warps("tf32", "barrier", "gates") == 4


def test_a_failed_wide_layout_leaves_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(triton_lstm.ENV_PRECISION, "tf32")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        triton_lstm._give_up(100, RuntimeError("no"), split=Layout(128, 16))
    assert triton_lstm._split_key(100, 128) in triton_lstm._failed
    assert triton_lstm._split_key(100, 64) not in triton_lstm._failed
    assert triton_lstm._split_key(100) not in triton_lstm._failed
    assert triton_lstm._key(100) not in triton_lstm._failed  # the row kernels stay


def test_split_rows_switch_values_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from study.errors import ConfigError
    from study.switches import switch

    monkeypatch.setenv(triton_lstm.ENV_SPLIT_ROWS, "48")
    with pytest.raises(ConfigError, match="HDETACH_TRITON_SPLIT_ROWS='48'"):
        switch(triton_lstm.ENV_SPLIT_ROWS)
    monkeypatch.delenv(triton_lstm.ENV_SPLIT_ROWS)
    assert switch(triton_lstm.ENV_SPLIT_ROWS) == "auto"


# --- compiled for an H100 on this machine --------------------------------------------------------

# Every wide layout that pack_layout.WIDEST_ROWS allows, at both benchmark sizes (tf32x3, a
# benchmark option, at H = 100 only), each kernel at its default warps.
WIDE_LAYOUTS = [
    (hidden, precision, sync, rows)
    for precision in ("tf32", "ieee", "tf32x3")
    for hidden in ((100, 128) if precision != "tf32x3" else (100,))
    for sync in ("barrier", "tagged")
    for rows in pack_layout.ROW_CHOICES[1:]
    if rows <= pack_layout.widest_rows(precision, sync)
]


def _recorded_launches(
    monkeypatch: pytest.MonkeyPatch, hidden: int, precision: str, sync: str, rows: int
) -> dict[str, _Recorded]:
    """Both kernels' launches for a pixel-MNIST-sized batch, recorded instead of run."""
    recorders = {}
    for name in ("_forward_kernel", "_backward_kernel"):
        recorders[name] = _Recorded(getattr(triton_split, name))
        monkeypatch.setattr(triton_split, name, recorders[name])
    inputs = _inputs((3, 2, 100, hidden, 1, "hc", True, True, True))
    _run(_split_apply(precision, 16, sync, "gates", rows), inputs)
    return recorders


@pytest.mark.parametrize(("hidden", "precision", "sync", "rows"), WIDE_LAYOUTS, ids=str)
def test_wide_split_kernels_compile_for_an_h100_without_spilling(
    hidden: int, precision: str, sync: str, rows: int, monkeypatch, tmp_path: Path
) -> None:
    recorders = _recorded_launches(monkeypatch, hidden, precision, sync, rows)
    for name, recorder in recorders.items():
        ((args, kwargs),) = recorder.calls
        assert kwargs["BB"] == rows
        if name == "_backward_kernel":
            assert kwargs["PARTIALS"] and kwargs["BLOCKWISE"]  # asked for gates: too wide
        compiled = _compile_for_hopper(recorder.kernel, args, kwargs)
        spilled = _local_memory_bytes(compiled.asm["cubin"], tmp_path)
        assert spilled is None or spilled <= SPILL_LIMIT, (name, kwargs["num_warps"], spilled)
        assert compiled.metadata.shared <= H100_SHARED, (name, compiled.metadata.shared)


# One choice wider than pack_layout.WIDEST_ROWS allows: the forward spills at every warps.
TOO_WIDE = [
    (precision, sync, pack_layout.widest_rows(precision, sync) * 2)
    for precision in ("tf32", "ieee", "tf32x3")
    for sync in ("barrier", "tagged")
    if pack_layout.widest_rows(precision, sync) < pack_layout.ROW_CHOICES[-1]
]


@pytest.mark.parametrize(("precision", "sync", "rows"), TOO_WIDE, ids=str)
def test_one_layout_wider_spills_at_any_warps(
    precision: str, sync: str, rows: int, monkeypatch, tmp_path: Path
) -> None:
    recorders = _recorded_launches(monkeypatch, 100, precision, sync, rows)
    ((args, kwargs),) = recorders["_forward_kernel"].calls
    spills = {}
    for warps in (4, 8, 16):
        compiled = _compile_for_hopper(recorders["_forward_kernel"].kernel, args, kwargs | {
            "num_warps": warps
        })  # fmt: skip
        spills[warps] = _local_memory_bytes(compiled.asm["cubin"], tmp_path)
    if None in spills.values():
        pytest.skip("triton ships no cuobjdump here")
    assert min(spills.values()) > SPILL_LIMIT, spills


# --- in Triton's interpreter ---------------------------------------------------------------------

# ((T, K, B, H, I, masks, grad_output, grad_h_n, grad_c_n), rows a program): three trials each.
# The first two are one program a trial (H <= 16 units, B <= rows), whose barrier waits on that
# program alone: the interpreter runs them one after another, as it always does, so a program
# that waited on another trial's would never finish. The last: 3 unit blocks x 2 row blocks a
# trial, its programs run as threads (tests/test_triton_lstm.py, _programs_as_threads), for the
# padded partial-sum ring's offsets between blocks and row blocks.
WIDE_CASES = [
    ((6, 3, 19, 16, 2, "hc", True, True, True), 32),
    ((5, 3, 40, 10, 1, "hc", True, False, True), 64),
    ((5, 3, 40, 40, 2, "hc", True, True, True), 32),
]


def _wide_interpreter_report() -> dict:
    """In the interpreter child: the largest error against the eager path per case."""
    errors = {}
    for precision in ("ieee", "tf32"):  # tf32: the one-product forward, in fp32 here
        for sync in ("barrier", "tagged"):
            for index, (case, rows) in enumerate(WIDE_CASES):
                inputs = _inputs(case, seed=11)
                expected = _run(DeviceMaskedLSTM.apply, inputs)
                # Asked for the gates handoff: wide layouts take the partial sums regardless.
                apply = _split_apply(precision, 16, sync, "gates", rows)
                if index < 2:
                    got = _run(apply, inputs)
                else:
                    with _programs_as_threads():
                        got = _run(apply, inputs)
                errors[f"{precision} {sync} {case} rows={rows}"] = _max_error(got, expected)
    case, rows = WIDE_CASES[0]
    inputs = _inputs(case, seed=11)
    expected = _run(DeviceMaskedLSTM.apply, inputs)
    wrong = _run(_split_apply("tf32", rows=rows), inputs, keep_h=1 - inputs["keep_h"])
    errors["wrong masks"] = _max_error(wrong, expected)
    return errors


def test_wide_split_packs_match_the_eager_path_in_the_interpreter() -> None:
    errors, wrong = _interpreter_errors(__file__, timeout=600)
    assert len(errors) == 2 * 2 * len(WIDE_CASES)
    assert max(errors.values()) < 1e-5, errors
    assert wrong > 1e-2  # the comparison can fail


# --- on a GPU ------------------------------------------------------------------------------------

# (T, B, H, I) of the benchmarks: copying T=100 and pixel MNIST.
COPYING, MNIST = (120, 100, 128, 1), (784, 100, 100, 1)
# The default layout of a full pack (128 rows) at both shapes; the narrower wide layouts (auto
# takes 64 rows for 5-9 trials at B = H = 100, 32 for 3-4), the tagged exchange's and full
# fp32's widest at the shorter one only (gpu_check.sh gives these tests about 50 s).
PACK_CASES = [
    ("copying", COPYING, "tf32", "barrier", "auto"),
    ("mnist", MNIST, "tf32", "barrier", "auto"),
    ("copying", COPYING, "tf32", "barrier", "64"),
    ("copying", COPYING, "tf32", "barrier", "32"),
    ("copying", COPYING, "tf32", "tagged", "auto"),  # 64 rows
    ("copying", COPYING, "ieee", "barrier", "auto"),  # 32 rows
]


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize(
    ("shape", "precision", "sync", "rows"),
    [case[1:] for case in PACK_CASES],
    ids=["-".join((name, *rest)) for name, _, *rest in PACK_CASES],
)
def test_a_resident_wide_split_pack_matches_the_eager_path_on_cuda(
    shape: tuple, precision: str, sync: str, rows: str, monkeypatch
) -> None:
    steps, batch, hidden, input_size = shape
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setenv(triton_lstm.ENV_KERNEL, "split")
    monkeypatch.setenv(triton_lstm.ENV_PRECISION, precision)
    monkeypatch.setenv(triton_lstm.ENV_SPLIT_SYNC, sync)
    monkeypatch.setenv(triton_lstm.ENV_SPLIT_ROWS, rows)
    sms = triton_split.multiprocessors(torch.device("cuda"))
    widest = pack_layout.widest_rows(precision, sync) if rows == "auto" else int(rows)
    members = pack_layout.resident_pack(batch, hidden, sms, widest)  # the whole GPU
    case = (steps, members, batch, hidden, input_size, "hc", True, True, True)
    inputs = _inputs(case, device="cuda", seed=5)
    layout = triton_lstm._split_layout(inputs["x"], members, batch, hidden)
    assert layout == Layout(widest, 16), (members, layout)
    expected = _split_matches_eager(inputs, precision)
    wrong = _run(triton_lstm.TritonMaskedLSTM.apply, inputs, keep_h=1 - inputs["keep_h"])
    assert not torch.allclose(wrong[7], expected[7], rtol=1e-3, atol=1e-3)


if __name__ == "__main__":  # the interpreter child of the interpreter test
    sys.path.insert(0, str(REPO))
    print(json.dumps(_wide_interpreter_report()))
