"""The Task interface every sequence task implements, with the option checks and the
cross-entropy that tasks share."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from study.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


class Task:
    """A sequence classification task: its data, the steps its loss reads, the loss, accuracy.

    Constructor keyword arguments are the YAML `task:` keys one to one (s4 style). Batches are
    time-major: x (T, B, input_size), targets shaped as `loss` expects. A new task is a subclass
    in its own module and one line in study.tasks.TASKS; the training loops and the models
    only call what is here.
    """

    name: ClassVar[str]
    input_size: ClassVar[int]
    num_classes: ClassVar[int]
    # How many final time steps the loss reads: the model makes logits for exactly these,
    # (readout_steps, B, classes). Every step for copying; only h_T for pixel MNIST, so its
    # head and backward skip the other 783 steps.
    readout_steps: int
    eval_splits: ClassVar[tuple[str, ...]] = ("val",)
    # Validation accuracy that counts as success in the robustness report.
    default_target: ClassVar[float]
    # The accuracy of guessing, which a run that learned nothing stays at or below: the report
    # says so rather than let a flat curve read as a result.
    chance_accuracy: ClassVar[float]
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
    def option(cls, options: dict[str, Any], name: str) -> Any:
        """An option as the task would take it: the given value, else its constructor default
        (None for no such option)."""
        if name in options:
            return options[name]
        parameter = inspect.signature(cls.__init__).parameters.get(name)
        return None if parameter is None else parameter.default

    @classmethod
    def sequence_length(cls, options: dict[str, Any]) -> int | None:
        """The sequence length the task would have with these options, without building it
        (which loads or draws its data): for `study plan --estimate`. A fixed `seq_len` class
        attribute by default; tasks whose length follows from an option override this."""
        length = getattr(cls, "seq_len", None)
        return length if isinstance(length, int) else None

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

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of read-out logits (readout_steps, B, classes): a 0-d tensor.

        For a pack, logits (K, readout_steps, B, classes) and targets stacked (K, ...) give the
        K members' losses, (K,). Device-side and graph-safe (no host sync, no shape that depends
        on values), as the packed step runs it inside a CUDA graph. It may depend on the task's
        shapes only: a pack's device step applies its first member's loss to every member.
        """
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        """Host-side, for evaluation: (correct predictions, predictions scored) in one batch."""
        raise NotImplementedError


def mean_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, item_dims: int
) -> torch.Tensor:
    """Cross-entropy averaged over the last `item_dims` dims of `targets` (`logits` add the
    classes); dims before those are a pack's members, each averaged on its own.

    One trial takes F.cross_entropy's own mean, the reference bits of a solo run; a pack, the
    per-item losses averaged per member, one kernel for all members.
    """
    classes = logits.shape[-1]
    members = targets.shape[: targets.dim() - item_dims]
    flat_logits, flat_targets = logits.reshape(-1, classes), targets.reshape(-1)
    if not members:
        return F.cross_entropy(flat_logits, flat_targets)
    per_item = F.cross_entropy(flat_logits, flat_targets, reduction="none")
    return per_item.view(*members, -1).mean(-1)
