"""The copying task (paper Sec. 5.1, Fig. 2 and 5): remember 10 symbols across T blank steps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from study.errors import ConfigError
from study.repro import make_generator
from study.tasks.base import Batch, Task, mean_cross_entropy

SYMBOLS = 10  # symbols to copy
BLANK, DELIMITER = 0, 9
NUM_CLASSES = 9  # outputs 0..8: blank or one of the symbols 1..8
MAX_OPTION = 10**9  # T, train_size, val_size: past any memory, well inside int64


def layout(symbols: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Authors' layout from the drawn symbols (n, 10): x float (n, T+20, 1), y int64 (n, T+20).

    Input: the 10 symbols, T-1 blanks, the delimiter, 10 blanks. Target: T+10 blanks, then the
    10 symbols. The input is the symbol value as one float (input size 1).
    """
    n = symbols.shape[0]
    inputs = torch.zeros(n, T + 2 * SYMBOLS, dtype=torch.int64)
    inputs[:, :SYMBOLS] = symbols
    inputs[:, SYMBOLS + T - 1] = DELIMITER
    targets = torch.zeros(n, T + 2 * SYMBOLS, dtype=torch.int64)
    targets[:, T + SYMBOLS :] = symbols
    return inputs.to(torch.float32).unsqueeze(-1), targets


def draw_symbols(n: int, generator: torch.Generator) -> torch.Tensor:
    """n rows of 10 symbols uniform in {1..8}."""
    return torch.randint(1, 9, (n, SYMBOLS), generator=generator)


def generate(n: int, T: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n copying sequences: x float32 (n, T+20, 1), y int64 (n, T+20), batch-first."""
    return layout(draw_symbols(n, generator), T)


class Copying(Task):
    """Copying with the authors' sizes: 100k training and 5k validation sequences made once,
    minibatches drawn with replacement. Only the drawn symbols are stored (n x 10); the blanks
    are laid out per batch, so T=300 costs no more memory than T=10.

    `data_seed` fixes the dataset across training seeds (our choice; the authors drew it from the
    run seed), so seeds vary the initialisation, batch order and detach draws only.
    """

    name = "copying"
    input_size = 1
    num_classes = NUM_CLASSES
    default_target = 0.99
    # Accuracy is over the 10 copied symbols, each uniform over 8 values (a model that outputs
    # blanks there, as an untrained one does, scores 0).
    chance_accuracy = 1 / 8

    def __init__(
        self, T: int = 100, train_size: int = 100_000, val_size: int = 5_000, data_seed: int = 0
    ) -> None:
        self.T = T
        self.seq_len = T + 2 * SYMBOLS
        self.readout_steps = self.seq_len  # the loss reads every step (authors' loss)
        self.train_symbols = draw_symbols(train_size, make_generator(data_seed, "copying/train"))
        self.val_symbols = draw_symbols(val_size, make_generator(data_seed, "copying/val"))

    @classmethod
    def sequence_length(cls, options: dict[str, Any]) -> int:
        """10 symbols, T blanks, 10 read-out steps (layout())."""
        return cls.option(options, "T") + 2 * SYMBOLS

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        for key in ("T", "train_size", "val_size", "data_seed"):
            value = options.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"task_options.{key}: must be an integer, got {value!r}")
        for key in ("T", "train_size", "val_size"):
            if options.get(key, 1) < 1:
                raise ConfigError(f"task_options.{key}: must be >= 1, got {options[key]}")
            # Beyond this, torch's shapes overflow at train time (a traceback, after `plan`
            # said yes); the paper's longest T is 300, its largest set 100,000 sequences.
            if options.get(key, 1) > MAX_OPTION:
                raise ConfigError(
                    f"task_options.{key}: must be at most {MAX_OPTION:,}, got {options[key]}"
                )

    def _time_major(self, symbols: torch.Tensor) -> Batch:
        x, y = layout(symbols, self.T)
        return x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous()

    def train_batch(self, iteration: int, batch_size: int, seed: int) -> Batch:
        generator = make_generator(seed, f"copying/batch/{iteration}")
        rows = torch.randint(0, len(self.train_symbols), (batch_size,), generator=generator)
        return self._time_major(self.train_symbols[rows])

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        if split != "val":  # eval_splits: the copying task has no test split (paper Sec. 5.1)
            raise ValueError(f"copying: no {split!r} split, only 'val'")
        for start in range(0, len(self.val_symbols), batch_size):
            yield self._time_major(self.val_symbols[start : start + batch_size])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Mean per-step cross-entropy over all T+20 steps, blanks included (authors' loss).
        return mean_cross_entropy(logits, targets, item_dims=2)  # targets (T+20, B)

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        # Accuracy on the last 10 steps only, where the symbols are to be reproduced.
        answer = logits[-SYMBOLS:].argmax(-1)
        correct = int((answer == targets[-SYMBOLS:]).sum())
        return correct, targets[-SYMBOLS:].numel()
