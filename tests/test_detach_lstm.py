"""DetachLSTM: nn.LSTM compatibility and exact masked gradients against an autograd reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from study.models import DetachLSTM

STEPS, BATCH, HIDDEN = 9, 4, 6


def reference_loop(
    lstm: DetachLSTM,
    x: torch.Tensor,
    detach_h: torch.Tensor | None,
    detach_c: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain autograd LSTM loop with stop-gradients placed as the paper's Algorithm 1 says."""
    h = x.new_zeros(x.shape[1], lstm.hidden_size)
    c = x.new_zeros(x.shape[1], lstm.hidden_size)
    outputs = []
    for t in range(x.shape[0]):
        h_in = h.detach() if detach_h is not None and detach_h[t] else h
        c_in = c.detach() if detach_c is not None and detach_c[t] else c
        gates = (
            x[t] @ lstm.weight_ih_l0.t()
            + lstm.bias_ih_l0
            + h_in @ lstm.weight_hh_l0.t()
            + lstm.bias_hh_l0
        )
        i, f, g, o = gates.chunk(4, 1)
        c = f.sigmoid() * c_in + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outputs.append(h)
    return torch.stack(outputs), h, c


def gradients(
    model: DetachLSTM, x: torch.Tensor, run, weights: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    output, h_n, c_n = run()
    loss = (output * weights[0]).sum() + (h_n * weights[1]).sum() + (c_n * weights[2]).sum()
    return list(torch.autograd.grad(loss, [x, *model.parameters()]))


def masks_for(kind: str, generator: torch.Generator) -> tuple:
    draw = torch.rand(STEPS, generator=generator) < 0.5
    draw[1] = True  # at least one cut, whatever the draw
    return {"none": (None, None), "h": (draw, None), "c": (None, draw)}[kind]


@pytest.mark.parametrize("input_size", [1, 3])
@pytest.mark.parametrize("kind", ["none", "h", "c"])
def test_masked_gradients_equal_autograd_reference(
    input_size: int, kind: str, cell_kind: str
) -> None:
    generator = torch.Generator().manual_seed(input_size * 10 + len(kind))
    model = DetachLSTM(input_size, HIDDEN).double()
    model.reset_parameters(generator)
    x = torch.randn(STEPS, BATCH, input_size, dtype=torch.float64, requires_grad=True)
    detach_h, detach_c = masks_for(kind, generator)
    weights = tuple(
        torch.randn(shape, dtype=torch.float64)
        for shape in [(STEPS, BATCH, HIDDEN), (BATCH, HIDDEN), (BATCH, HIDDEN)]
    )

    def ours():
        output, (h_n, c_n) = model(x, detach_h=detach_h, detach_c=detach_c)
        return output, h_n[0], c_n[0]

    got = gradients(model, x, ours, weights)
    want = gradients(model, x, lambda: reference_loop(model, x, detach_h, detach_c), weights)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_wrong_masks_give_different_gradients() -> None:
    """The equality above is not vacuous: the reference with other masks disagrees."""
    model = DetachLSTM(1, HIDDEN).double()
    x = torch.randn(STEPS, BATCH, 1, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(STEPS, dtype=torch.bool)
    mask[3] = True
    shifted = torch.roll(mask, 1)
    weights = tuple(
        torch.randn(shape, dtype=torch.float64)
        for shape in [(STEPS, BATCH, HIDDEN), (BATCH, HIDDEN), (BATCH, HIDDEN)]
    )

    def ours():
        output, (h_n, c_n) = model(x, detach_h=mask)
        return output, h_n[0], c_n[0]

    got = gradients(model, x, ours, weights)
    for wrong in [(shifted, None), (None, mask), (None, None)]:
        want = gradients(model, x, lambda w=wrong: reference_loop(model, x, *w), weights)
        assert max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)) > 1e-6


def test_matches_nn_lstm_outputs_and_gradients_without_masks(cell_kind: str) -> None:
    torch.manual_seed(0)
    reference = nn.LSTM(3, HIDDEN).double()
    model = DetachLSTM(3, HIDDEN).double()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(STEPS, BATCH, 3, dtype=torch.float64)
    state = (torch.randn(1, BATCH, HIDDEN, dtype=torch.float64),) * 2
    out_ref, (h_ref, c_ref) = reference(x, state)
    out, (h, c) = model(x, state)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-12)
    (out_ref.sum() + c_ref.sum()).backward()
    (out.sum() + c.sum()).backward()
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-12, msg=name)


def test_state_dict_round_trips_with_nn_lstm() -> None:
    reference = nn.LSTM(2, HIDDEN)
    model = DetachLSTM(2, HIDDEN)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    reference.load_state_dict(model.state_dict())
    model.load_state_dict(reference.state_dict())


def test_init_is_uniform_within_one_over_sqrt_hidden() -> None:
    model = DetachLSTM(1, 64)
    for parameter in model.parameters():
        assert parameter.abs().max() <= 1 / 8
        assert parameter.abs().max() > 0.9 / 8  # the range is used, not a narrower init


def test_evaluation_forward_matches_training_forward() -> None:
    model = DetachLSTM(1, HIDDEN)
    x = torch.randn(STEPS, BATCH, 1)
    trained, _ = model(x)
    with torch.no_grad():
        evaluated, _ = model(x)
    torch.testing.assert_close(trained.detach(), evaluated, rtol=1e-5, atol=1e-6)


def test_mask_of_wrong_length_is_rejected() -> None:
    model = DetachLSTM(1, HIDDEN)
    with pytest.raises(ValueError, match="detach_h must have shape"):
        model(torch.randn(STEPS, BATCH, 1), detach_h=torch.zeros(STEPS + 1, dtype=torch.bool))
