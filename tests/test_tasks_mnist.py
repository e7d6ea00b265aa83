"""Pixel and permuted MNIST: torchvision loading from IDX files (raw and gz), splits, readout."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from study.config import ConfigError
from study.tasks import make_task
from study.tasks.mnist_data import IDX_FILES
from study.tasks.permuted_mnist import PermutedMNIST
from study.tasks.pixel_mnist import PixelMNIST

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx_folder(folder: Path, train: int = 30, test: int = 10, gz: bool = False) -> Path:
    """Four IDX files in MNIST's format: image i has every pixel equal to i, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)

    def images(n: int) -> bytes:
        pixels = bytes(i % 256 for i in range(n) for _ in range(784))
        return struct.pack(">IIII", 2051, n, 28, 28) + pixels

    def labels(n: int) -> bytes:
        return struct.pack(">II", 2049, n) + bytes(i % 10 for i in range(n))

    contents = [images(train), labels(train), images(test), labels(test)]
    for name, data in zip(IDX_FILES, contents, strict=True):
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as handle:
                handle.write(data)
        else:
            (folder / name).write_bytes(data)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("gz", [False, True])
def test_loads_flat_idx_folder_with_the_requested_split(tmp_path: Path, gz: bool) -> None:
    data_dir = write_idx_folder(tmp_path / "idx", gz=gz)
    task = PixelMNIST(data_dir=str(data_dir), val_size=6)
    train_images, train_labels = task.splits["train"]
    assert len(train_images) == 24 and len(task.splits["val"][0]) == 6
    assert len(task.splits["test"][0]) == 10
    assert train_labels[:3].tolist() == [0, 1, 2]
    assert task.splits["val"][1][0].item() == 24 % 10  # validation = the last training images


def test_batches_are_pixels_in_unit_range_read_at_the_last_step(tmp_path: Path) -> None:
    task = PixelMNIST(data_dir=str(write_idx_folder(tmp_path / "idx")), val_size=6)
    x, y = task.train_batch(0, 8, seed=0)
    assert x.shape == (784, 8, 1) and x.min() >= 0 and x.max() <= 1
    image_index = (x[0, :, 0] * 255).round().long()  # image i has every pixel equal to i
    assert torch.equal(x[0], x[-1]) and (image_index % 10).tolist() == y.tolist()
    # The classifier's last-step read-out is (1, B, classes); only that step is scored.
    right = torch.nn.functional.one_hot(y, 10).float().unsqueeze(0)
    assert task.loss_and_metrics(right, y)[1:] == (8, 8)
    assert task.loss_and_metrics(right.roll(1, dims=-1), y)[1] == 0


def test_epoch_order_covers_every_training_image_once(tmp_path: Path) -> None:
    task = PixelMNIST(data_dir=str(write_idx_folder(tmp_path / "idx")), val_size=6)
    seen = torch.cat([task.train_batch(i, 8, seed=3)[1] for i in range(3)])
    first_epoch = torch.cat([(task.train_batch(i, 8, seed=3)[0][0, :, 0] * 255) for i in range(3)])
    assert len(set(first_epoch.round().long().tolist())) == 24 and len(seen) == 24


def test_permutation_is_fixed_across_training_seeds_by_default(tmp_path: Path) -> None:
    data_dir = str(write_idx_folder(tmp_path / "idx"))
    a = make_task("permuted_mnist", {"data_dir": data_dir, "val_size": 6}, seed=0)
    b = make_task("permuted_mnist", {"data_dir": data_dir, "val_size": 6}, seed=1)
    assert isinstance(a, PermutedMNIST)
    assert torch.equal(a.pixel_order, b.pixel_order)
    assert sorted(a.pixel_order.tolist()) == list(range(784))
    authors = [
        make_task(
            "permuted_mnist",
            {"data_dir": data_dir, "val_size": 6, "permutation_seed": "seed"},
            seed=s,
        )
        for s in (0, 1)
    ]
    assert not torch.equal(authors[0].pixel_order, authors[1].pixel_order)


def test_missing_files_name_folder_files_and_both_remedies(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        PixelMNIST(data_dir=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "t10k-labels-idx1-ubyte" in message
    assert "data_dir" in message and "download=true" in message and "\n" not in message


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_real_fashion_mnist_from_the_debian_package() -> None:
    task = PixelMNIST(dataset="fashion_mnist", data_dir=str(FASHION))
    assert [len(task.splits[s][0]) for s in ("train", "val", "test")] == [50_000, 10_000, 10_000]
    assert set(task.splits["test"][1].tolist()) == set(range(10))
