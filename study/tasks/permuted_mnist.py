"""Permuted pixel MNIST (paper Sec. 5.2, Fig. 7): one fixed shuffle of the 784 pixels."""

from __future__ import annotations

from typing import Any

import torch

from study.errors import ConfigError
from study.repro import make_generator
from study.tasks.mnist_data import VAL_SIZE
from study.tasks.pixel_mnist import PixelMNIST


class PermutedMNIST(PixelMNIST):
    """The same permutation for train, validation and test.

    The authors drew it from the training seed, so each seed met a different task. Ours comes from
    `permutation_seed` (fixed across training seeds, so seeds vary only the training), and
    `permutation_seed: seed` restores the authors' behaviour.
    """

    name = "permuted_mnist"
    default_target = 0.90

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str | None = None,
        download: bool = False,
        subset: int | None = None,
        val_size: int = VAL_SIZE,
        permutation_seed: int = 0,
    ) -> None:
        super().__init__(dataset, data_dir, download, subset, val_size)
        generator = make_generator(permutation_seed, "permutation")
        self.pixel_order = torch.randperm(self.seq_len, generator=generator)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        value = options.get("permutation_seed", 0)
        if value != "seed" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(
                f"task_options.permutation_seed: must be an integer or 'seed' (the trial's seed, "
                f"as the authors did), got {value!r}"
            )
