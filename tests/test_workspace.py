"""Workspace: a buffer is reused only once nothing refers to it; blocks stay aligned."""

from __future__ import annotations

import copy
import io

import torch

from study.models import DetachLSTM
from study.models.workspace import Workspace, aligned_blocks


def test_member_blocks_start_64_byte_aligned() -> None:
    blocks = aligned_blocks(5, (3, 7), torch.empty(0))
    assert blocks.shape == (5, 3, 7)
    assert all(block.data_ptr() % 64 == 0 for block in blocks)


def test_buffer_is_reused_only_after_every_view_is_gone() -> None:
    workspace, like = Workspace(), torch.empty(0)
    first = workspace.take(2, (3, 4), like)
    view = first[1]
    del first
    second = workspace.take(2, (3, 4), like)  # `view` still holds the first buffer
    assert second.data_ptr() != view.data_ptr() - view.storage_offset() * 4
    address = second.data_ptr()
    del second
    assert workspace.take(2, (3, 4), like).data_ptr() == address


def test_free_buffers_of_another_shape_are_dropped() -> None:
    workspace, like = Workspace(), torch.empty(0)
    workspace.take(1, (10,), like)
    workspace.take(1, (20,), like)
    assert [tuple(buffer.shape) for buffer, _ in workspace.buffers] == [(1, 20)]


def test_saved_tensors_keep_a_sequence_buffer_until_the_backward_is_done() -> None:
    model = DetachLSTM(1, 8)
    x = torch.randn(5, 3, 1)
    output, _ = model(x)
    loss = output.sum()
    addresses = {buffer.data_ptr() for buffer, _ in model.workspace.buffers}
    model(x)  # a second forward while the first graph is alive: new buffers
    assert len(model.workspace.buffers) > len(addresses)
    loss.backward(retain_graph=True)
    first_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(torch.randn(5, 3, 1))  # must not overwrite what the retained graph still holds
    loss.backward()
    for again, first in zip(model.parameters(), first_grads, strict=True):
        assert torch.equal(again.grad, first)


def test_training_steps_reuse_the_same_buffers() -> None:
    model = DetachLSTM(1, 8)
    x = torch.randn(5, 3, 1)
    model(x)[0].sum().backward()
    addresses = sorted(buffer.data_ptr() for buffer, _ in model.workspace.buffers)
    for _ in range(3):
        model(x)[0].sum().backward()
    assert sorted(buffer.data_ptr() for buffer, _ in model.workspace.buffers) == addresses


def test_copies_and_pickles_of_a_model_leave_the_buffers_behind() -> None:
    model = DetachLSTM(1, 32)
    model(torch.randn(50, 20, 1))[0].sum().backward()
    assert model.workspace.buffers
    saved = io.BytesIO()
    torch.save(model, saved)
    assert saved.tell() < 100_000  # the parameters' 18 kB; the gate buffers alone are 1 MB
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    for clone in (loaded, copy.deepcopy(model)):
        assert clone.workspace.buffers == []
        output, _ = clone(torch.randn(50, 20, 1))
        output.sum().backward()
