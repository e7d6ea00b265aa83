"""Copying task: the authors' layout, readout on the last 10 steps, resumable batches."""

from __future__ import annotations

import torch

from study.repro import make_generator
from study.tasks.copying import Copying, generate


def test_generate_layout_matches_the_paper() -> None:
    T = 6
    x, y = generate(4, T, make_generator(0, "test"))
    assert x.dtype == torch.float32 and x.shape == (4, T + 20, 1)
    assert y.dtype == torch.int64 and y.shape == (4, T + 20)
    symbols = x[:, :10, 0].long()
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (x[:, 10 : 10 + T - 1] == 0).all()  # T-1 blanks
    assert (x[:, 10 + T - 1, 0] == 9).all()  # the delimiter
    assert (x[:, 10 + T :] == 0).all()  # 10 blanks while the answer is due
    assert (y[:, : T + 10] == 0).all()
    assert torch.equal(y[:, T + 10 :], symbols)


def test_loss_over_all_steps_accuracy_over_last_ten() -> None:
    task = Copying(T=5, train_size=10, val_size=10)
    x, y = task.train_batch(0, 3, seed=0)
    assert x.shape == (25, 3, 1) and y.shape == (25, 3)  # time-major
    assert task.readout_steps == 25  # the model reads out every step
    perfect = torch.nn.functional.one_hot(y, 9).float() * 50
    (correct, count), loss = task.metrics(perfect, y), task.loss(perfect, y)
    assert count == 30 and correct == 30 and loss.item() < 1e-6
    # Wrong on the blanks only: accuracy (last 10 steps) unaffected, loss not.
    wrong_blanks = perfect.clone()
    wrong_blanks[:15] = torch.nn.functional.one_hot(torch.full_like(y[:15], 3), 9).float() * 50
    assert task.metrics(wrong_blanks, y)[0] == 30 and task.loss(wrong_blanks, y).item() > 1.0
    # Wrong on one answer step: accuracy drops by exactly 3 of 30 predictions.
    wrong_answer = perfect.clone()
    wrong_answer[-1] = torch.nn.functional.one_hot((y[-1] % 8) + 1, 9).float() * 50
    assert task.metrics(wrong_answer, y)[0] == 27


def test_batches_are_a_function_of_iteration_and_seed() -> None:
    task = Copying(T=5, train_size=50, val_size=10)
    a = task.train_batch(7, 4, seed=1)
    assert torch.equal(a[0], task.train_batch(7, 4, seed=1)[0])
    assert not torch.equal(a[0], task.train_batch(8, 4, seed=1)[0])
    assert not torch.equal(a[0], task.train_batch(7, 4, seed=2)[0])


def test_dataset_is_fixed_by_data_seed_not_training_seed() -> None:
    one, two = Copying(T=5, train_size=20, val_size=8), Copying(T=5, train_size=20, val_size=8)
    assert torch.equal(one.val_symbols, two.val_symbols)
    other = Copying(T=5, train_size=20, val_size=8, data_seed=1)
    assert not torch.equal(one.val_symbols, other.val_symbols)
    val = list(one.eval_batches("val", 3))
    assert [b[0].shape[1] for b in val] == [3, 3, 2]


def test_sequence_length_follows_T_without_building_the_task() -> None:
    # `study plan --estimate` prices a copying study by its length; a built task agrees.
    assert Copying.sequence_length({"T": 300}) == 320
    assert Copying.sequence_length({}) == Copying(train_size=1, val_size=1).seq_len == 120
