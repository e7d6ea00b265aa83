"""The Task interface every sequence task implements, and option checking shared by tasks."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from study.config import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


class Task:
    """A sequence classification task: data, read-out position, loss and accuracy.

    Constructor keyword arguments are the YAML `task:` keys one to one (s4 style). Batches are
    time-major: x (T, B, input_size), targets shaped as `loss_and_metrics` expects.
    """

    name: ClassVar[str]
    input_size: ClassVar[int]
    num_classes: ClassVar[int]
    # "all": the loss reads every step (copying); "last": only h_T (pixel MNIST).
    readout: ClassVar[str]
    eval_splits: ClassVar[tuple[str, ...]] = ("val",)
    # Validation accuracy that counts as success in the robustness report.
    default_target: ClassVar[float]
    seq_len: int

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise ConfigError for an unknown option; subclasses add value checks."""
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(
                f"task_options: unknown option(s) {', '.join(unknown)} for task {cls.name}; "
                f"allowed: {', '.join(allowed)}"
            )

    @classmethod
    def check_data(cls, options: dict[str, Any]) -> None:
        """Raise ConfigError for data the task would not find on this machine (checked options);
        tasks that read files override it. Cheap: nothing is loaded."""

    def train_batch(self, iteration: int, batch_size: int, seed: int) -> Batch:
        """The minibatch of `iteration`, a pure function of (iteration, seed): resumable."""
        raise NotImplementedError

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """The fixed evaluation set of `split` in order."""
        raise NotImplementedError

    def loss_and_metrics(
        self, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        """Mean loss, number of correct predictions and number of predictions scored."""
        raise NotImplementedError


def last_step_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Cross-entropy and accuracy on the final step only (pixel MNIST, paper Sec. 5.2)."""
    final = logits[-1]
    loss = F.cross_entropy(final, targets)
    correct = int((final.argmax(-1) == targets).sum())
    return loss, correct, targets.numel()
