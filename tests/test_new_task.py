"""A new task is one class and one registry line: train() and train_packed() run it unchanged."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from study import packed_train
from study.config import TrialConfig
from study.packed_train import train_packed
from study.repro import make_generator
from study.tasks import TASKS
from study.tasks.base import Batch, Task, mean_cross_entropy
from study.train import train
from study.vocabulary import COMPLETED

ANSWER = 3  # the last ANSWER steps repeat the first ANSWER inputs


class Echo(Task):
    """Repeat the first 3 of T random symbols on the last 3 steps: a loss read on 3 steps,
    neither every step (copying) nor the last one (MNIST)."""

    name = "echo"
    input_size = 1
    num_classes = 4
    readout_steps = ANSWER
    default_target = 0.9

    def __init__(self, T: int = 8, val_size: int = 12) -> None:
        self.seq_len = T
        self.val = self._batch(make_generator(0, "echo/val"), val_size)

    def _batch(self, generator: torch.Generator, size: int) -> Batch:
        symbols = torch.randint(0, self.num_classes, (self.seq_len, size), generator=generator)
        return symbols.float().unsqueeze(-1), symbols[:ANSWER].clone()

    def train_batch(self, iteration: int, batch_size: int, seed: int) -> Batch:
        return self._batch(make_generator(seed, f"echo/{iteration}"), batch_size)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        x, y = self.val
        for start in range(0, x.shape[1], batch_size):
            yield x[:, start : start + batch_size], y[:, start : start + batch_size]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return mean_cross_entropy(logits, targets, item_dims=2)  # targets (ANSWER, B)

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        return int((logits.argmax(-1) == targets).sum()), targets.numel()


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setitem(TASKS, "echo", Echo)  # the one registry line
    return dict(task="echo", task_options={"T": 8}, hidden_size=10, batch_size=6, iterations=12)


def _finite_curve(curve: list[dict[str, float]]) -> bool:
    return bool(curve) and all(math.isfinite(v) for point in curve for v in point.values())


def test_a_new_task_trains_alone_and_in_a_pack(echo: dict) -> None:
    configs = [
        TrialConfig(**echo, eval_every=4, method="h_detach", p_detach=0.5, seed=1),
        TrialConfig(**echo, eval_every=4, lr=3e-3, clip_norm=None, seed=2),
    ]
    solo = [train(config) for config in configs]
    for result in solo:
        assert result.status == COMPLETED and [p["iteration"] for p in result.curve] == [4, 8, 12]
        assert _finite_curve(result.curve) and 0 <= result.final["val/accuracy"] <= 1
    packed = train_packed(configs)
    assert [result.curve for result in packed] == [result.curve for result in solo]


def test_a_new_tasks_loss_runs_in_the_device_step(
    echo: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The graph-safe path (one batched loss for the pack), run eagerly on a CPU.
    monkeypatch.setattr(packed_train, "_device_steps", lambda device: True)
    configs = [TrialConfig(**echo, eval_every=6, seed=seed) for seed in (1, 2)]
    for result, config in zip(train_packed(configs), configs, strict=True):
        solo = train(config).curve
        assert _finite_curve(result.curve) and len(result.curve) == len(solo)
        for ours, theirs in zip(result.curve, solo, strict=True):
            assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)
