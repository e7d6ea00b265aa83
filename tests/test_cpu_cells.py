"""The compiled LSTM cell step (lstm_cells.c) against torch ops, and its build and fallback."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from study.models import cpu_cells, notices
from study.models.cpu_cells import CompiledCells, TorchCells

BATCH, HIDDEN = 7, 37  # 37: SIMD main loop plus a scalar tail in every row


def compiled() -> CompiledCells:
    cpu_cells._compiled_cells.cache_clear()
    cells = cpu_cells._compiled_cells()
    assert cells is not None, "the C kernel did not build here (is gcc installed?)"
    return cells


def step_inputs(dtype: torch.dtype, scale: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    return {
        "gates": draw(BATCH, 4 * HIDDEN),
        "c_prev": draw(BATCH, HIDDEN),
        "dh": draw(BATCH, HIDDEN),
        "grad_out": draw(BATCH, HIDDEN),
        "dc": draw(BATCH, HIDDEN),
    }


def run(cells, inputs: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> list:
    gates = inputs["gates"].clone()
    c_prev = inputs["c_prev"]
    c_next, tanh_c, h_next = (torch.empty_like(c_prev) for _ in range(3))
    cells.forward(gates, c_prev, c_next, tanh_c, h_next)
    grads = {name: None if name in absent else inputs[name] for name in ("dh", "grad_out", "dc")}
    dgates, dc_out = torch.empty_like(gates), torch.empty_like(c_prev)
    cells.backward(
        gates, c_prev, tanh_c, grads["dh"], grads["grad_out"], grads["dc"], dgates, dc_out
    )
    return [gates, c_next, tanh_c, h_next, dgates, dc_out]


@pytest.mark.parametrize("absent", [(), ("dh",), ("grad_out", "dc"), ("dh", "grad_out", "dc")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_step_equals_torch_ops(dtype: torch.dtype, absent: tuple[str, ...]) -> None:
    inputs = step_inputs(dtype, scale=3.0)
    ours, reference = run(compiled(), inputs, absent), run(TorchCells(), inputs, absent)
    tolerance = 2e-6 if dtype == torch.float32 else 1e-14
    for name, a, b in zip(
        ["act", "c", "tanh_c", "h", "dgates", "dc"], ours, reference, strict=True
    ):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)


def test_compiled_step_is_exact_in_the_saturated_range_and_keeps_nan() -> None:
    inputs = step_inputs(torch.float32, scale=60.0)  # exp's clamps at +-88 are reached
    inputs["gates"][0, 0] = float("nan")
    ours, reference = run(compiled(), inputs), run(TorchCells(), inputs)
    for a, b in zip(ours[:4], reference[:4], strict=True):  # forward: to float32's rounding
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, equal_nan=True)
    # Backward: 1 - tanh(c)^2 near saturation magnifies either tanh's last-bit error.
    for a, b in zip(ours[4:], reference[4:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, equal_nan=True)
    assert ours[0][0, 0].isnan() and ours[3][0, 0].isnan()  # a diverged trial is still seen


def test_a_wrong_gradient_is_caught_by_the_comparison() -> None:
    inputs = step_inputs(torch.float32, scale=1.0)
    reference = run(TorchCells(), inputs)
    inputs["dc"] = inputs["dc"] * 1.001
    ours = run(compiled(), inputs)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours[4], reference[4], rtol=2e-6, atol=2e-6)


def test_library_is_built_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = cpu_cells.build_library()
    assert first.parent == tmp_path / "hdetach-study" / "kernels"
    built_at = first.stat().st_mtime_ns
    assert cpu_cells.build_library() == first
    assert first.stat().st_mtime_ns == built_at
    assert [path.name for path in first.parent.iterdir()] == [first.name]  # no scratch left


def test_without_a_compiler_the_torch_cells_run_and_say_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu_cells._compiled_cells.cache_clear()
    monkeypatch.setattr(notices, "_said", set())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = cpu_cells.cells_for(torch.zeros(1))
            second = cpu_cells.cells_for(torch.zeros(1))
        assert type(first) is TorchCells and second is first
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "could not build lstm_cells.c" in messages[0]
        assert "install a C compiler" in messages[0]
    finally:
        cpu_cells._compiled_cells.cache_clear()


def test_switch_selects_torch_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert cpu_cells.implementation(cpu) == "compiled"  # the tests' machines have gcc
    assert cpu_cells.implementation(torch.device("cuda")) is None
    monkeypatch.setenv(cpu_cells.ENV_SWITCH, "torch")
    cpu_cells._compiled_cells.cache_clear()
    try:
        assert type(cpu_cells.cells_for(torch.zeros(1))) is TorchCells
        assert cpu_cells.implementation(cpu) == "torch"
    finally:
        cpu_cells._compiled_cells.cache_clear()


def test_other_dtypes_use_torch_cells() -> None:
    assert type(cpu_cells.cells_for(torch.zeros(1, dtype=torch.bfloat16))) is TorchCells
