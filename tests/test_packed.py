"""Packed model and device path: members equal their solo models; masks act as in the paper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from study.models import DetachLSTM, SequenceClassifier
from study.models.device_lstm import device_lstm, keep_factors
from study.models.packed import MEMBER_NAMES, PackedClassifier


def _members(count: int, input_size: int, hidden: int, classes: int) -> list[SequenceClassifier]:
    models = []
    for k in range(count):
        model = SequenceClassifier(input_size, hidden, classes)
        model.reset_parameters(torch.Generator().manual_seed(100 + k))
        models.append(model)
    return models


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.dim() == 1:  # one label per sequence, read on the last step
        return F.cross_entropy(logits[-1], targets)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


CASES = [
    # (T, B, I, H, classes, K, readout_steps (None: every step), p_h, p_c)
    (30, 100, 1, 128, 9, 2, None, 0.25, 0.0),
    (30, 100, 1, 100, 10, 3, 1, 0.25, 0.0),
    (20, 37, 3, 50, 10, 4, None, 0.3, 0.2),
    (25, 20, 1, 100, 10, 2, 1, 0.0, 0.25),
    (20, 30, 1, 40, 9, 2, 7, 0.25, 0.0),  # the last 7 steps
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_packed_cpu_members_are_bit_identical_to_solo(
    case: tuple, threads: int, cell_kind: str
) -> None:
    steps, batch, input_size, hidden, classes, count, readout_steps, p_h, p_c = case
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        models = _members(count, input_size, hidden, classes)
        xs = [torch.rand(steps, batch, input_size) for _ in range(count)]
        shape = (batch,) if readout_steps == 1 else (readout_steps or steps, batch)
        ys = [torch.randint(0, classes, shape) for _ in range(count)]
        detach_h = (torch.rand(count, steps) < p_h) if p_h else None
        detach_c = (torch.rand(count, steps) < p_c) if p_c else None
        if detach_h is not None:
            detach_h[0] = False  # one member with masks that never detach
        solo = []
        for k, model in enumerate(models):
            logits = model(
                xs[k],
                None if detach_h is None else detach_h[k],
                None if detach_c is None else detach_c[k],
                readout_steps=readout_steps,
            )
            _loss(logits, ys[k]).backward()
            grads = [parameter.grad for parameter in model.parameters()]
            solo.append((logits.detach(), grads, torch.nn.utils.get_total_norm(grads)))

        packed = PackedClassifier.from_members(models)
        logits = packed(torch.stack(xs), detach_h, detach_c, readout_steps=readout_steps)
        losses = torch.stack([_loss(logits[k], ys[k]) for k in range(count)])
        (grad,) = torch.autograd.grad(losses.sum(), packed.flat)
        for k in range(count):
            member_grads = packed.member_views(grad, k)
            assert torch.equal(logits[k].detach(), solo[k][0])
            for name, ours, theirs in zip(MEMBER_NAMES, member_grads, solo[k][1], strict=True):
                assert torch.equal(ours, theirs), f"member {k} {name}"
            assert torch.equal(torch.nn.utils.get_total_norm(member_grads), solo[k][2])
    finally:
        torch.set_num_threads(previous)


def test_members_round_trip_through_the_flat_parameter() -> None:
    models = _members(3, 2, 6, 4)
    packed = PackedClassifier.from_members(models)
    target = SequenceClassifier(2, 6, 4)
    packed.store_member(1, target)
    for name, value in target.state_dict().items():
        assert torch.equal(value, models[1].state_dict()[name])


def _reference(x, h0, c0, weights, detach_h, detach_c):
    """Autograd loop with explicit .detach() per member and step (the authors' formulation)."""
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    outputs, last_h, last_c = [], [], []
    for k in range(x.shape[1]):
        h, c, hs = h0[k], c0[k], []
        for t in range(x.shape[0]):
            h_in = h.detach() if detach_h[k, t] else h
            c_in = c.detach() if detach_c[k, t] else c
            gates = x[t, k] @ weight_ih[k].t() + bias_ih[k] + h_in @ weight_hh[k].t() + bias_hh[k]
            i, f, g, o = gates.chunk(4, 1)
            c = f.sigmoid() * c_in + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
            hs.append(h)
        outputs.append(torch.stack(hs))
        last_h.append(h)
        last_c.append(c)
    return torch.stack(outputs, 1), torch.stack(last_h), torch.stack(last_c)


@pytest.mark.parametrize("input_size", [1, 3])
def test_device_function_matches_autograd_reference_with_masks(input_size: int) -> None:
    torch.manual_seed(1)
    steps, count, batch, hidden = 7, 3, 4, 5

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x = torch.randn(steps, count, batch, input_size, dtype=torch.float64)
    weights = (
        leaf(count, 4 * hidden, input_size),
        leaf(count, 4 * hidden, hidden),
        leaf(count, 4 * hidden),
        leaf(count, 4 * hidden),
    )
    h0, c0 = leaf(count, batch, hidden), leaf(count, batch, hidden)
    detach_h = torch.rand(count, steps) < 0.4
    detach_c = torch.rand(count, steps) < 0.3
    grads_out = [
        torch.randn(steps, count, batch, hidden, dtype=torch.float64),
        torch.randn(count, batch, hidden, dtype=torch.float64),
        torch.randn(count, batch, hidden, dtype=torch.float64),
    ]
    inputs = [*weights, h0, c0]

    def run(outputs):
        total = sum((out * g).sum() for out, g in zip(outputs, grads_out, strict=True))
        return [*outputs, *torch.autograd.grad(total, inputs)]

    expected = run(_reference(x, h0, c0, weights, detach_h, detach_c))
    keep_h = keep_factors(detach_h, steps, count, x)
    keep_c = keep_factors(detach_c, steps, count, x)
    actual = run(device_lstm(x, h0, c0, weights, keep_h, keep_c))
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # A deliberately wrong mask must not pass.
    wrong = keep_factors(~detach_h, steps, count, x)
    assert not torch.allclose(run(device_lstm(x, h0, c0, weights, wrong, keep_c))[3], expected[3])


@pytest.mark.parametrize("masks", ["none", "h", "c"])
def test_detach_lstm_device_path_equals_cpu_path(masks: str) -> None:
    torch.manual_seed(2)
    lstm = DetachLSTM(3, 6).double()
    x = torch.randn(9, 4, 3, dtype=torch.float64)
    mask = torch.rand(9) < 0.4
    detach_h = mask if masks == "h" else None
    detach_c = mask if masks == "c" else None
    zeros = x.new_zeros(4, 6)
    grad_out = torch.randn(9, 4, 6, dtype=torch.float64)

    def grads(output):
        return torch.autograd.grad((output * grad_out).sum(), list(lstm.parameters()))

    cpu = grads(lstm(x, detach_h=detach_h, detach_c=detach_c)[0])
    device = grads(lstm._device_forward(x, zeros, zeros, detach_h, detach_c)[0])
    for ours, theirs in zip(device, cpu, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("readout_steps", [None, 1, 4])
def test_packed_device_path_equals_cpu_path(readout_steps: int | None) -> None:
    torch.manual_seed(3)
    models = [model.double() for model in _members(3, 1, 8, 5)]
    packed = PackedClassifier.from_members(models)
    x = torch.rand(3, 11, 6, 1, dtype=torch.float64)
    detach_h = torch.rand(3, 11) < 0.3

    def run():
        logits = packed(x, detach_h, None, readout_steps=readout_steps)
        assert logits.shape == (3, readout_steps or 11, 6, 5)
        return [logits, *torch.autograd.grad((logits**2).sum(), packed.flat)]

    cpu = run()
    packed.device_path = True
    device = run()
    for ours, theirs in zip(device, cpu, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
