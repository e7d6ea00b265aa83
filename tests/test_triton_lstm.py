"""The Triton LSTM kernels: against the eager path in Triton's CPU interpreter, and on a GPU."""

from __future__ import annotations

import contextlib
import gc
import inspect
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from study.models import notices
from study.models.device_lstm import device_lstm
from study.models.step_lstm import DeviceMaskedLSTM

REPO = Path(__file__).resolve().parent.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton", reason="needs triton")
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _fresh_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """say_once, the failed-kernel set and the kernels used remember for the whole process:
    each test starts without them, so a fallback in one cannot pass unsaid in the next."""
    from study.models import triton_lstm

    monkeypatch.setattr(notices, "_said", set())
    monkeypatch.setattr(triton_lstm, "_failed", set())
    monkeypatch.setattr(triton_lstm, "used", set())


# (T, K, B, H, I, masks, grad_output, grad_h_n, grad_c_n): B=19 is no multiple of BLOCK_B, H=10
# pads to 16 columns, and the absent gradients exercise set_materialize_grads(False).
CASES = [
    (7, 2, 5, 10, 1, "hc", True, True, True),
    (7, 2, 19, 32, 3, "none", True, False, False),
    (7, 2, 19, 10, 3, "h", False, True, True),
    (7, 2, 5, 32, 1, "c", True, False, True),
    (7, 1, 19, 10, 1, "hc", False, False, True),
]


def _inputs(case: tuple, device: str = "cpu", seed: int = 0) -> dict:
    steps, members, batch, hidden, input_size, masks, *present = case
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    def keep(kind: str) -> torch.Tensor | None:
        if kind not in masks:
            return None
        return (torch.rand(steps, members, generator=generator) > 0.4).float().to(device)

    bound = hidden**-0.5
    return {
        "x": rand(steps, members, batch, input_size),
        "h0": rand(members, batch, hidden, scale=0.5),
        "c0": rand(members, batch, hidden, scale=0.5),
        "weights": [
            rand(members, 4 * hidden, input_size, scale=bound),
            rand(members, 4 * hidden, hidden, scale=bound),
            rand(members, 4 * hidden, scale=bound),
            rand(members, 4 * hidden, scale=bound),
        ],
        "keep_h": keep("h"),
        "keep_c": keep("c"),
        "grads": [
            rand(steps, members, batch, hidden) if present[0] else None,
            rand(members, batch, hidden) if present[1] else None,
            rand(members, batch, hidden) if present[2] else None,
        ],
    }


def _run(function, inputs: dict, keep_h: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Outputs and the gradients of every input (None where an output gets no gradient)."""
    leaves = [inputs["x"], inputs["h0"], inputs["c0"], *inputs["weights"]]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    keep_h = inputs["keep_h"] if keep_h is None else keep_h
    outputs = function(*leaves, keep_h, inputs["keep_c"])
    loss = sum(
        (out * g).sum() for out, g in zip(outputs, inputs["grads"], strict=True) if g is not None
    )
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach() for t in (*outputs, *grads)]


def _max_error(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


def _interpreter_report() -> dict:
    """Runs in a child process with TRITON_INTERPRET=1: max |Triton - eager| per case.

    Both product paths run: "ieee" (operands read back from memory in slices) and "tf32"
    (operands in registers; the interpreter computes it in fp32).
    """
    from study.models import triton_lstm

    report: dict = {}
    for precision in ("ieee", "tf32"):
        os.environ[triton_lstm.ENV_PRECISION] = precision
        for case in CASES:
            inputs = _inputs(case)
            args = (inputs["x"], inputs["h0"], inputs["c0"], inputs["weights"])
            assert triton_lstm.supports(*args)
            expected = _run(DeviceMaskedLSTM.apply, inputs)
            actual = _run(triton_lstm.TritonMaskedLSTM.apply, inputs)
            report[f"{precision} {case}"] = _max_error(actual, expected)
        # Two register tiles per state (H > CHUNK), as for 128 < H <= 256 on a GPU, made small.
        triton_lstm.CHUNK = 16
        inputs = _inputs((5, 2, 19, 20, 2, "hc", True, True, True))
        expected = _run(DeviceMaskedLSTM.apply, inputs)
        actual = _run(triton_lstm.TritonMaskedLSTM.apply, inputs)
        report[f"{precision} two tiles"] = _max_error(actual, expected)
        triton_lstm.CHUNK = 128
    os.environ.pop(triton_lstm.ENV_PRECISION)
    # A deliberately wrong h-detach mask must not match.
    inputs = _inputs(CASES[0])
    expected = _run(DeviceMaskedLSTM.apply, inputs)
    wrong = _run(triton_lstm.TritonMaskedLSTM.apply, inputs, keep_h=1 - inputs["keep_h"])
    report["wrong mask"] = _max_error(wrong, expected)
    # A backward kernel that fails to compile: the eager loop takes over from the saved state.
    triton_lstm._backward_kernel = None  # subscripting it raises TypeError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = _run(triton_lstm.TritonMaskedLSTM.apply, inputs)
    report["backward fallback"] = _max_error(fallback, expected)
    report["fallback warnings"] = [str(w.message) for w in caught]
    return report


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    result = subprocess.run(
        [sys.executable, __file__],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("case", [str(case) for case in CASES] + ["two tiles"])
def test_interpreted_kernels_match_the_eager_path(
    interpreter_report: dict, precision: str, case: str
) -> None:
    assert interpreter_report[f"{precision} {case}"] < TOLERANCE


def test_interpreted_kernels_with_a_wrong_mask_do_not_match(interpreter_report: dict) -> None:
    assert interpreter_report["wrong mask"] > 100 * TOLERANCE


def test_backward_compile_failure_falls_back_to_the_eager_loop(interpreter_report: dict) -> None:
    assert interpreter_report["backward fallback"] < TOLERANCE
    messages = interpreter_report["fallback warnings"]
    assert len(messages) == 1 and "eager CUDA path" in messages[0]


def test_forward_failure_falls_back_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the interpreter a kernel cannot take CPU tensors: launching raises, as a
    # compile failure would on a GPU, and the eager path must take over.
    from study.models import triton_lstm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = _inputs(CASES[0])
    expected = _run(DeviceMaskedLSTM.apply, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            actual = _run(triton_lstm.TritonMaskedLSTM.apply, inputs)
            assert _max_error(actual, expected) == 0
    assert sum("Triton LSTM kernel failed" in str(w.message) for w in caught) == 1


def test_a_split_kernel_failure_leaves_the_row_kernels(monkeypatch) -> None:
    from study.models import triton_lstm

    monkeypatch.setenv(triton_lstm.ENV_PRECISION, "tf32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        triton_lstm._give_up(100, RuntimeError("no"), split=triton_lstm.triton_split.NARROW)
    assert triton_lstm._split_key(100) in triton_lstm._failed
    assert triton_lstm._key(100) not in triton_lstm._failed
    assert "then the row kernels" in str(caught[0].message)
    # Another exchange is another configuration: not given up.
    monkeypatch.setenv(triton_lstm.ENV_SPLIT_SYNC, "tagged")
    assert triton_lstm._split_key(100) not in triton_lstm._failed
    monkeypatch.delenv(triton_lstm.ENV_SPLIT_SYNC)
    inputs = _inputs(CASES[0])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_lstm.supports(inputs["x"], inputs["h0"], inputs["c0"], inputs["weights"])


def test_cpu_tensors_and_other_dtypes_keep_the_eager_path(monkeypatch) -> None:
    from study.models import triton_lstm

    inputs = _inputs(CASES[0])
    args = (inputs["x"], inputs["h0"], inputs["c0"], inputs["weights"])
    monkeypatch.setenv(triton_lstm.ENV_PRECISION, "tf32")
    assert not triton_lstm.supports(*args)  # a CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_lstm.supports(*args)
    assert not triton_lstm.supports(args[0].double(), *args[1:])
    monkeypatch.setenv(triton_lstm.ENV_SWITCH, "0")
    assert not triton_lstm.supports(*args)


def test_full_fp32_takes_the_per_step_path_unless_forced(monkeypatch) -> None:
    from study.models import triton_lstm

    inputs = _inputs(CASES[0])
    args = (inputs["x"], inputs["h0"], inputs["c0"], inputs["weights"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(triton_lstm.ENV_PRECISION, raising=False)
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default: full fp32
    assert not triton_lstm.supports(*args)  # slower than the per-step path on an H100
    monkeypatch.setenv(triton_lstm.ENV_PRECISION, "ieee")
    assert triton_lstm.supports(*args)


def test_the_eager_path_frees_its_graph_without_the_cycle_collector() -> None:
    # A graph kept alive by a reference cycle keeps the parameters' AccumulateGrad nodes, made
    # on the eager step's stream, which invalidated a later CUDA-graph capture of that model.
    inputs = _inputs(CASES[0])
    leaves = [t.requires_grad_() for t in inputs["weights"]]
    gc.disable()
    try:
        outputs = DeviceMaskedLSTM.apply(
            inputs["x"], inputs["h0"], inputs["c0"], *leaves, None, None
        )
        refs = [weakref.ref(output) for output in outputs]
        del outputs
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


# --- on a GPU ---------------------------------------------------------------------------------

# The benchmark shapes (copying T=100 and pixel MNIST) and a packed one, as (T, K, B, H, I).
GPU_SHAPES = [(120, 1, 100, 128, 1), (784, 1, 100, 100, 1), (120, 16, 100, 128, 1)]


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["copying", "mnist", "copying-K16"])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("kernel", ["auto", "rows"])  # auto: split where it fits (K = 1)
def test_triton_matches_the_eager_path_on_cuda(
    shape: tuple, precision: str, kernel: str, monkeypatch
) -> None:
    from study.models import triton_lstm

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setenv(triton_lstm.ENV_PRECISION, precision)  # the kernels' products, forced
    if kernel == "rows":  # else as set outside (gpu_check.sh sets rows if split failed)
        monkeypatch.setenv(triton_lstm.ENV_KERNEL, "rows")
    case = (*shape, "hc", True, True, True)
    inputs = _inputs(case, device="cuda", seed=1)
    assert triton_lstm.supports(inputs["x"], inputs["h0"], inputs["c0"], inputs["weights"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel that fell back fails the test
        actual = _run(triton_lstm.TritonMaskedLSTM.apply, inputs)
    assert not triton_lstm._failed
    expected = _run(DeviceMaskedLSTM.apply, inputs)
    tolerance = 1e-4 if precision == "ieee" else 1e-2
    for ours, theirs in zip(actual, expected, strict=True):
        # Gradients summed over 784 steps and 100 rows: compare relative to their size.
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * max(scale, 1.0))
    wrong = _run(triton_lstm.TritonMaskedLSTM.apply, inputs, keep_h=1 - inputs["keep_h"])
    assert not torch.allclose(wrong[7], expected[7], rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@CUDA
def test_triton_tf32_is_close_to_the_fp32_path_on_cuda(monkeypatch) -> None:
    case = (120, 1, 100, 128, 1, "h", True, False, False)
    inputs = _inputs(case, device="cuda", seed=2)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ieee = _run(device_lstm_apply, inputs)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32 = _run(device_lstm_apply, inputs)
    for ours, theirs in zip(tf32, ieee, strict=True):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2 * max(scale, 1.0))


def device_lstm_apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, keep_h, keep_c):
    return device_lstm(x, h0, c0, (w_ih, w_hh, b_ih, b_hh), keep_h, keep_c)


@pytest.mark.cuda
@CUDA
def test_the_study_step_runs_triton_inside_its_cuda_graph(monkeypatch) -> None:
    from study.config import TrialConfig
    from study.models import triton_lstm
    from study.packed_train import _Pack, cuda_precision, train_packed
    from study.trial import TrialState

    monkeypatch.setattr(notices, "_said", set())
    calls = []
    original = triton_lstm.triton_lstm

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(triton_lstm, "triton_lstm", counted)
    base = dict(
        task="copying",
        task_options={"T": 10, "train_size": 400, "val_size": 60},
        hidden_size=100,
        batch_size=20,
        iterations=20,
        eval_every=10,
        device="cuda",
        precision="tf32",  # the Triton kernels' precision by default
    )
    configs = [
        TrialConfig(**base, method="h_detach", p_detach=0.5, seed=1),
        TrialConfig(**base, method="c_detach", p_detach=0.25, seed=2),
        TrialConfig(**base, seed=3),
    ]
    device = torch.device("cuda")
    with warnings.catch_warnings(), cuda_precision("tf32", device):  # as train_packed sets it
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture or kernel fails
        pack = _Pack([TrialState(config, device) for config in configs], device)
        pack.step(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for iteration in range(1, 4):
                pack.step(iteration)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert pack.graphed is not None and pack.graphed.captured and calls
        ours = train_packed(configs)
    monkeypatch.setenv(triton_lstm.ENV_SWITCH, "0")
    eager = train_packed(configs)
    for a, b in zip(ours, eager, strict=True):
        assert a.status == b.status and len(a.curve) == len(b.curve)
        for point_a, point_b in zip(a.curve, b.curve, strict=True):
            for key, value in point_b.items():
                if key.endswith("accuracy"):
                    assert abs(point_a[key] - value) <= 0.05, key
                else:
                    # Both in TF32, with different summation orders.
                    assert point_a[key] == pytest.approx(value, rel=1e-2, abs=1e-4), key


# --- the hidden-split kernels (study/models/triton_split.py) ---------------------------------

# ((T, K, B, H, I, masks, grad_output, grad_h_n, grad_c_n), hidden units per program).
# H <= units: one program per row block; the last two have 3 and 2 unit blocks, whose programs
# exchange h and the backward's share every step (run as threads: _programs_as_threads).
SPLIT_CASES = [
    ((7, 2, 19, 16, 1, "hc", True, True, True), 16),
    ((6, 1, 5, 10, 3, "h", False, True, False), 16),
    ((5, 2, 17, 16, 1, "", True, False, False), 16),
    ((6, 2, 19, 24, 3, "hc", True, True, True), 32),
    ((5, 1, 17, 32, 1, "c", True, False, True), 32),
    ((6, 2, 19, 40, 2, "hc", True, True, True), 16),
    ((5, 1, 17, 64, 1, "h", True, False, True), 32),
]


@contextlib.contextmanager
def _programs_as_threads(timeout: float = 60.0) -> Iterator[None]:
    """Triton's interpreter runs a launch's programs one after another, so split programs
    waiting on each other would never proceed. Here each program is a thread (its program_id
    thread-local), all started together, as a GPU keeps them all resident: the exchange's
    protocol and index arithmetic run on a CPU, under whatever interleaving the threads take
    (not the GPU's memory model). A launch whose programs still wait after `timeout` seconds
    raises TimeoutError. Reimplements GridExecutor.__call__ on the interpreter's own helpers
    (Triton 3.8), without its pre-run hooks, which these kernels do not have."""
    import threading

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    local = threading.local()
    original_class, original_call = type(builder), interpreter.GridExecutor.__call__

    class PerThread(original_class):
        grid_idx = property(
            lambda self: getattr(local, "index", None),
            lambda self, index: setattr(local, "index", index),
        )

    def call(self, *args_dev, **kwargs):
        names = inspect.getfullargspec(self.fn).args
        kwargs = {key: value for key, value in kwargs.items() if key in names}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        scope = interpreter._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {
                name: arg if name in self.constexprs else interpreter._implicit_cvt(arg)
                for name, arg in args.items()
            }
            grid = (*self.grid, *(1,) * (3 - len(self.grid)))
            builder.set_grid_dim(*grid)
            errors = []

            def program(index: tuple[int, int, int]) -> None:
                builder.grid_idx = index
                try:
                    self.fn(**args)
                except BaseException as error:  # re-raised below, in the launching thread
                    errors.append(error)

            indices = itertools.product(*map(range, grid))
            threads = [threading.Thread(target=program, args=(i,), daemon=True) for i in indices]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + timeout
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if any(thread.is_alive() for thread in threads):
                raise TimeoutError(f"split programs still waiting after {timeout} s")
            if errors:
                raise errors[0]
        finally:
            scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    builder.__class__ = PerThread
    interpreter.GridExecutor.__call__ = call
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # waiting programs spin: hand the GIL on often
    try:
        yield
    finally:
        sys.setswitchinterval(switch_interval)
        builder.__class__ = original_class
        interpreter.GridExecutor.__call__ = original_call


def _split_apply(
    precision: str, units: int = 16, sync: str = "barrier", handoff: str = "gates", rows: int = 16
):
    def apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, keep_h, keep_c):
        launch = (precision, units, sync, handoff, rows)
        return SplitFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, keep_h, keep_c, launch)

    return apply


class SplitFunction(torch.autograd.Function):
    """The split kernels as an autograd Function, as TritonMaskedLSTM runs them."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, keep_h, keep_c, launch):
        from study.models import triton_split
        from study.models.step_lstm import input_projections

        steps, members, batch, _ = x.shape
        hidden = h0.shape[-1]
        gates = input_projections(x, w_ih, b_ih, b_hh)
        all_h = x.new_empty(steps + 1, members, batch, hidden)
        all_c = torch.empty_like(all_h)
        all_h[0], all_c[0] = h0, c0
        precision, units, sync, handoff, rows = ctx.launch = launch
        warps = triton_split.default_warps(precision, sync, rows=rows)
        layout, weights = triton_split.Layout(rows, units), w_hh.contiguous()
        triton_split.forward(gates, weights, all_h, all_c, precision, warps, layout, sync)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w_ih, w_hh, all_h, all_c, gates, keep_h, keep_c)
        return all_h[1:], all_h[steps], all_c[steps]

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        from study.models import triton_split
        from study.models.step_lstm import parameter_grads

        x, w_ih, w_hh, all_h, all_c, gates, keep_h, keep_c = ctx.saved_tensors
        precision, units, sync, handoff, rows = ctx.launch
        grad_gates = torch.empty_like(gates)
        grad_h0, grad_c0 = torch.empty_like(all_h[0]), torch.empty_like(all_h[0])
        triton_split.backward(
            gates,
            all_c,
            w_hh,
            (grad_output, grad_h_n, grad_c_n),
            (keep_h, keep_c),
            (grad_gates, grad_h0, grad_c0),
            precision,
            triton_split.default_warps(precision, sync, handoff, rows),
            triton_split.Layout(rows, units),
            sync,
            handoff,
        )
        needs = ctx.needs_input_grad
        grads = parameter_grads(needs, grad_gates, x, w_ih, all_h, grad_h0, grad_c0)
        return (*grads, None)


def _split_interpreter_report() -> dict:
    """In the interpreter child: the split kernels' largest error against the eager path."""
    errors = {}
    # "tf32" takes the one-product forward (ONE_PRODUCT); the interpreter computes it in fp32.
    kinds = itertools.product(("ieee", "tf32"), ("barrier", "tagged"), ("gates", "partials"))
    with _programs_as_threads():
        for precision, sync, handoff in kinds:
            for case, units in SPLIT_CASES:
                inputs = _inputs(case, seed=7)
                expected = _run(DeviceMaskedLSTM.apply, inputs)
                got = _run(_split_apply(precision, units, sync, handoff), inputs)
                key = f"{precision} {sync} {handoff} {case} units={units}"
                errors[key] = _max_error(got, expected)
        wrong_inputs = _inputs(SPLIT_CASES[-2][0], seed=7)
        expected = _run(DeviceMaskedLSTM.apply, wrong_inputs)
        wrong = _run(_split_apply("tf32"), wrong_inputs, keep_h=1 - wrong_inputs["keep_h"])
    errors["wrong masks"] = _max_error(wrong, expected)
    return errors


def _interpreter_errors(script: str, *args: str, timeout: int) -> tuple[dict, float]:
    """Run a test module as Triton's interpreter child (TRITON_INTERPRET=1); its last line is
    a JSON of max errors against the eager path by case, plus "wrong masks": the error with the
    masks inverted, which shows the comparison can fail. Returns (errors, that error)."""
    result = subprocess.run(
        [sys.executable, script, *args],
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    return errors, errors.pop("wrong masks")


def test_split_kernels_match_the_eager_path_in_the_interpreter() -> None:
    errors, wrong = _interpreter_errors(__file__, "split", timeout=300)
    assert max(errors.values()) < 1e-5, errors
    assert wrong > 1e-2  # the comparison can fail


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=["copying", "mnist"])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize(
    ("units", "sync", "handoff"),
    [
        (16, "barrier", "gates"),
        (32, "barrier", "gates"),
        (16, "tagged", "gates"),
        (16, "barrier", "partials"),
        (32, "barrier", "partials"),
        (16, "tagged", "partials"),
    ],
    ids=str,
)
def test_split_kernels_match_the_eager_path_on_cuda(
    shape: tuple, precision: str, units: int, sync: str, handoff: str, monkeypatch
):
    from study.models import triton_lstm, triton_split

    monkeypatch.setenv(triton_lstm.ENV_KERNEL, "split")
    monkeypatch.setenv(triton_lstm.ENV_PRECISION, precision)
    monkeypatch.setenv(triton_lstm.ENV_SPLIT_UNITS, str(units))
    monkeypatch.setenv(triton_lstm.ENV_SPLIT_SYNC, sync)
    monkeypatch.setenv(triton_lstm.ENV_SPLIT_BACKWARD, handoff)
    case = (*shape, "hc", True, True, True)
    inputs = _inputs(case, device="cuda", seed=3)
    assert triton_split.fits(shape[1], shape[2], shape[3], torch.device("cuda"), units)
    _split_matches_eager(inputs, precision)


def _split_matches_eager(inputs: dict, precision: str) -> list[torch.Tensor]:
    """Run the split kernels (a fallback fails) and check them against the eager path, at
    tolerances relative to each output's size (gradients sum over up to 784 steps and 100
    rows); returns the eager outputs."""
    from study.models import triton_lstm

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel that fell back fails the test
        actual = _run(triton_lstm.TritonMaskedLSTM.apply, inputs)
    assert triton_lstm.used == {"split"} and not triton_lstm._failed
    expected = _run(DeviceMaskedLSTM.apply, inputs)
    tolerance = 1e-4 if precision == "ieee" else 1e-2
    for ours, theirs in zip(actual, expected, strict=True):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * max(scale, 1.0))
    return expected


@pytest.mark.cuda
@CUDA
def test_after_a_one_trial_kernel_fails_later_steps_take_the_row_kernels(monkeypatch) -> None:
    from study.models import triton_lstm, triton_split

    def broken(*args, **kwargs) -> None:
        raise RuntimeError("out of resources (made up)")

    monkeypatch.setattr(triton_split, "forward", broken)
    monkeypatch.setenv(triton_lstm.ENV_PRECISION, "tf32")
    inputs = _inputs((*GPU_SHAPES[0], "hc", True, True, True), device="cuda", seed=4)
    expected = _run(DeviceMaskedLSTM.apply, inputs)
    with pytest.warns(RuntimeWarning, match="split LSTM kernel failed"):
        first = _run(triton_lstm.TritonMaskedLSTM.apply, inputs)  # eager, this once
    triton_lstm.used.clear()
    second = _run(triton_lstm.TritonMaskedLSTM.apply, inputs)
    assert triton_lstm.used == {"rows"}
    for ours, eager, theirs in zip(second, first, expected, strict=True):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(eager, theirs, rtol=1e-6, atol=1e-6 * max(scale, 1.0))
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2 * max(scale, 1.0))


# --- compiled for an H100 on this machine --------------------------------------------------------
# Neither the interpreter nor a machine without a GPU compiles the kernels; triton can, for a
# named target (its wheel carries ptxas). Each kernel is compiled with the exact arguments the
# wrappers launch it with, recorded in place of the launch.


class _Recorded:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _compile_for_hopper(kernel, args: tuple, kwargs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages")}
    names = kernel.arg_names
    values = dict(zip(names, args, strict=False)) | kwargs
    signature, constants = {}, {}
    for index, name in enumerate(names):
        value = values[name]
        if name in kwargs:
            signature[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            pointer = {torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}
            signature[name] = pointer[value.dtype]
        else:
            signature[name] = "i32"
    source = ASTSource(kernel, signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _local_memory_bytes(cubin: bytes, tmp_path: Path) -> int | None:
    """Per-thread stack (register spills) from cuobjdump -res-usage, if triton ships it."""
    import triton.backends.nvidia

    tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    return int(usage.split("STACK:")[1].split()[0])


@pytest.mark.parametrize("hidden", [100, 128, 256])
def test_row_kernels_compile_for_an_h100(hidden: int, monkeypatch) -> None:
    from study.models import triton_lstm

    recorders = {}
    for name in ("_forward_kernel", "_backward_kernel"):
        recorders[name] = _Recorded(getattr(triton_lstm, name))
        monkeypatch.setattr(triton_lstm, name, recorders[name])
    monkeypatch.setenv(triton_lstm.ENV_PRECISION, "tf32")
    inputs = _inputs((5, 2, 19, hidden, 1, "hc", True, True, True))
    _run(triton_lstm.TritonMaskedLSTM.apply, inputs)  # launches nothing: records the calls
    for recorder in recorders.values():
        ((args, kwargs),) = recorder.calls
        assert kwargs["H"] == hidden and kwargs["PRECISION"] == "tf32"
        _compile_for_hopper(recorder.kernel, args, kwargs)


# The default 16 units per program in both precisions, both exchanges and both backward
# handoffs; 32 (a sweep option) in tf32 only: full fp32 at 32 units keeps twice the weights in
# registers and spills at 4 warps. (Each at its default warps: triton_split.default_warps.)
@pytest.mark.parametrize(
    ("hidden", "units", "precision", "sync", "handoff"),
    [
        (h, 16, p, s, o)
        for h in (100, 128)
        for p in ("ieee", "tf32")
        for s in ("barrier", "tagged")
        for o in ("gates", "partials")
    ]
    + [(100, 32, "tf32", s, o) for s in ("barrier", "tagged") for o in ("gates", "partials")],
)
def test_split_kernels_compile_for_an_h100_without_spilling(
    hidden: int, units: int, precision: str, sync: str, handoff: str, monkeypatch, tmp_path: Path
) -> None:
    from study.models import triton_split

    recorders = {}
    for name in ("_forward_kernel", "_backward_kernel"):
        recorders[name] = _Recorded(getattr(triton_split, name))
        monkeypatch.setattr(triton_split, name, recorders[name])
    inputs = _inputs((5, 1, 19, hidden, 1, "hc", True, True, True))
    _run(_split_apply(precision, units, sync, handoff), inputs)
    for name, recorder in recorders.items():
        ((args, kwargs),) = recorder.calls
        compiled = _compile_for_hopper(recorder.kernel, args, kwargs)
        # A whole program runs on one SM and waits on the others every step: spilled registers
        # would be reloaded on that critical path. (A few bytes of fp32 forward spill remain.)
        spilled = _local_memory_bytes(compiled.asm["cubin"], tmp_path)
        assert spilled is None or spilled <= 128, (name, spilled)


if __name__ == "__main__":  # the interpreter child of interpreter_report
    sys.path.insert(0, str(REPO))
    report = _split_interpreter_report if sys.argv[1:] == ["split"] else _interpreter_report
    print(json.dumps(report()))
