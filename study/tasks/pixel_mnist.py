"""Pixel (sequential) MNIST (paper Sec. 5.2, Figs. 3-6 and 8): one pixel per step, 784 steps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from study.errors import ConfigError
from study.repro import make_generator
from study.tasks.base import Batch, Task, mean_cross_entropy
from study.tasks.mnist_data import DATASETS, VAL_SIZE, check_data_dir, load_images


class PixelMNIST(Task):
    """Loss and prediction on the last step only; test accuracy is read at the best validation
    point (paper Sec. 5.2). `dataset: fashion_mnist` runs the same task on Fashion-MNIST.

    `subset` (our addition, for smoke runs) keeps only the first N images of each split;
    `val_size` is how many of the last official training images validate (10,000 in the paper).
    """

    name = "pixel_mnist"
    input_size = 1
    num_classes = 10
    readout_steps = 1  # loss and prediction on h_T only (paper Sec. 5.2)
    eval_splits = ("val", "test")
    default_target = 0.97
    chance_accuracy = 0.1  # ten classes, about equally frequent
    seq_len = 784

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str | None = None,
        download: bool = False,
        subset: int | None = None,
        val_size: int = VAL_SIZE,
    ) -> None:
        self.dataset = dataset
        self.splits = load_images(dataset, data_dir, download, val_size)
        if subset is not None:
            self.splits = {k: (x[:subset], y[:subset]) for k, (x, y) in self.splits.items()}
        self.pixel_order: torch.Tensor | None = None  # identity; permuted MNIST sets one
        # seed -> (epoch, that epoch's shuffle). Keyed by seed because a pack's members share
        # one task object (packed_train._shared_tasks) while each shuffles by its own seed.
        self._epoch_orders: dict[int, tuple[int, torch.Tensor]] = {}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        dataset = options.get("dataset", "mnist")
        if dataset not in DATASETS:
            raise ConfigError(
                f"task_options.dataset: unknown dataset {dataset!r}; "
                f"allowed: {', '.join(DATASETS)}"
            )
        data_dir = options.get("data_dir")
        # Checked here, not in load_images: a bad value must fail `study plan`, not every trial.
        if data_dir is not None and (not isinstance(data_dir, str) or not data_dir.strip()):
            raise ConfigError(
                f"task_options.data_dir: must be a folder path (a string), got {data_dir!r}"
            )
        if not isinstance(options.get("download", False), bool):
            raise ConfigError("task_options.download: must be true or false")
        for key in ("subset", "val_size"):
            value = options.get(key)
            if value is not None and (type(value) is not int or value < 1):  # true is no count
                raise ConfigError(f"task_options.{key}: must be a positive integer, got {value!r}")

    @classmethod
    def check_data(cls, options: dict[str, Any]) -> None:
        dataset = options.get("dataset", "mnist")
        check_data_dir(dataset, options.get("data_dir"), options.get("download", False))

    def _to_batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        pixels = images.to(torch.float32).div_(255.0)  # values in [0, 1]
        if self.pixel_order is not None:
            pixels = pixels[:, self.pixel_order]
        return pixels.t().unsqueeze(-1).contiguous(), labels

    def train_batch(self, iteration: int, batch_size: int, seed: int) -> Batch:
        images, labels = self.splits["train"]
        per_epoch = max(1, len(images) // batch_size)
        epoch, position = divmod(iteration, per_epoch)
        cached = self._epoch_orders.get(seed)
        if cached is None or cached[0] != epoch:
            # One shuffle per epoch from (seed, epoch): the batch of any iteration is recomputable,
            # so a resumed trial sees the same data as an uninterrupted one.
            generator = make_generator(seed, f"mnist/epoch/{epoch}")
            order = torch.randperm(len(images), generator=generator)
            cached = self._epoch_orders[seed] = (epoch, order)
        rows = cached[1][position * batch_size : (position + 1) * batch_size]
        return self._to_batch(images[rows], labels[rows])

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        images, labels = self.splits[split]
        for start in range(0, len(images), batch_size):
            end = start + batch_size
            yield self._to_batch(images[start:end], labels[start:end])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # logits (..., 1, B, 10): the one read-out step against the labels (..., B).
        return mean_cross_entropy(logits[..., -1, :, :], targets, item_dims=1)

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        correct = int((logits[-1].argmax(-1) == targets).sum())
        return correct, targets.numel()
