"""Pixel and permuted MNIST: torchvision loading from IDX files (raw and gz), splits, readout."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

from study.config import TrialConfig
from study.errors import ConfigError
from study.tasks import make_task
from study.tasks.mnist_data import IDX_FILES
from study.tasks.permuted_mnist import PermutedMNIST
from study.tasks.pixel_mnist import PixelMNIST

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx_folder(folder: Path, train: int = 30, test: int = 10, gz: bool = False) -> Path:
    """Four IDX files in MNIST's format: image i's pixel j is (i + 7 j) % 256 (so its first pixel
    names the image, and every pixel of an image differs from its neighbours), label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)

    def images(n: int) -> bytes:
        pixels = bytes((i + 7 * j) % 256 for i in range(n) for j in range(784))
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
    image_index = (x[0, :, 0] * 255).round().long()  # image i's first pixel is i
    assert (image_index % 10).tolist() == y.tolist()
    assert torch.equal((x[1] * 255).round(), (x[0] * 255).round().add(7).remainder(256))
    # The classifier's last-step read-out is (1, B, classes); only that step is scored.
    assert task.readout_steps == 1
    right = torch.nn.functional.one_hot(y, 10).float().unsqueeze(0)
    assert task.metrics(right, y) == (8, 8)
    assert task.metrics(right.roll(1, dims=-1), y)[0] == 0
    assert task.loss(right * 50, y).item() < 1e-6 < task.loss(right.roll(1, dims=-1), y).item()


def _first_pixels(task: PixelMNIST, iterations: range, seed: int) -> list[int]:
    """The images (named by their first pixel) of the given iterations' batches of 8."""
    pixels = torch.cat([task.train_batch(i, 8, seed=seed)[0][0, :, 0] for i in iterations])
    return (pixels * 255).round().long().tolist()


def test_epoch_order_covers_every_training_image_once_and_reshuffles(tmp_path: Path) -> None:
    task = PixelMNIST(data_dir=str(write_idx_folder(tmp_path / "idx")), val_size=6)
    first_epoch = _first_pixels(task, range(3), seed=3)
    second_epoch = _first_pixels(task, range(3, 6), seed=3)
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(24))
    assert first_epoch != second_epoch


def test_one_task_object_shuffles_by_each_callers_seed(tmp_path: Path) -> None:
    """A pack's members share one task object: interleaved seeds must not share a shuffle."""
    data_dir = str(write_idx_folder(tmp_path / "idx"))
    shared = PixelMNIST(data_dir=data_dir, val_size=6)
    interleaved = {seed: [] for seed in (1, 2)}
    for iteration in range(6):
        for seed in interleaved:
            interleaved[seed] += _first_pixels(shared, range(iteration, iteration + 1), seed)
    for seed, images in interleaved.items():
        assert images == _first_pixels(PixelMNIST(data_dir=data_dir, val_size=6), range(6), seed)
    assert interleaved[1] != interleaved[2]


def test_permuted_batches_are_the_pixel_batches_reordered(tmp_path: Path) -> None:
    data_dir = str(write_idx_folder(tmp_path / "idx"))
    pixel = PixelMNIST(data_dir=data_dir, val_size=6)
    permuted = make_task("permuted_mnist", {"data_dir": data_dir, "val_size": 6}, seed=0)
    order = permuted.pixel_order
    assert not torch.equal(order, torch.arange(784))
    pairs = [(permuted.train_batch(4, 8, seed=5), pixel.train_batch(4, 8, seed=5))]
    for split in ("val", "test"):
        pairs += zip(permuted.eval_batches(split, 4), pixel.eval_batches(split, 4), strict=True)
    for (x_permuted, y_permuted), (x_pixel, y_pixel) in pairs:
        assert torch.equal(x_permuted, x_pixel[order]) and torch.equal(y_permuted, y_pixel)


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


def test_check_data_finds_what_loading_would_refuse_without_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^task_options\.data_dir: \S+/absent is no folder; "):
        PixelMNIST.check_data({"data_dir": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match=r"lacks train-images-idx3-ubyte, "):
        PermutedMNIST.check_data({"data_dir": str(tmp_path)})
    PixelMNIST.check_data({"data_dir": str(write_idx_folder(tmp_path / "idx"))})
    PixelMNIST.check_data({"data_dir": str(tmp_path / "absent"), "download": True})
    PixelMNIST.check_data({})  # the cache, or a download: the loader's to judge


def test_files_that_are_no_idx_files_are_one_line(tmp_path: Path) -> None:
    for name in IDX_FILES:
        (tmp_path / name).write_text("not an IDX file\n")
    with pytest.raises(ConfigError) as error:
        PixelMNIST(data_dir=str(tmp_path))
    assert str(error.value).startswith(
        f"task_options.data_dir: {tmp_path}: the mnist files there are not IDX files ("
    )


def test_files_replaced_at_the_source_are_staged_again(tmp_path: Path) -> None:
    data_dir = write_idx_folder(tmp_path / "idx", train=30)
    assert len(PixelMNIST(data_dir=str(data_dir), val_size=6).splits["train"][0]) == 24
    for name in IDX_FILES:  # a later mtime than the staged copies: replaced
        (data_dir / name).unlink()
    write_idx_folder(data_dir, train=40)
    later = max(p.stat().st_mtime for p in (tmp_path / "cache").rglob("*-ubyte")) + 10
    for name in IDX_FILES:
        os.utime(data_dir / name, (later, later))
    assert len(PixelMNIST(data_dir=str(data_dir), val_size=6).splits["train"][0]) == 34


@pytest.mark.parametrize("key", ["subset", "val_size"])
def test_a_count_given_as_true_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^task_options\.{key}: must be a positive integer"):
        PixelMNIST.check_options({key: True})


@pytest.mark.parametrize("task", [PixelMNIST, PermutedMNIST])
@pytest.mark.parametrize("data_dir", [5, 2024.0, "", ["a"]])
def test_data_dir_must_be_a_folder_path(task: type[PixelMNIST], data_dir: object) -> None:
    with pytest.raises(ConfigError) as error:
        task.check_options({"data_dir": data_dir})
    expected = f"task_options.data_dir: must be a folder path (a string), got {data_dir!r}"
    assert str(error.value) == expected
    task.check_options({"data_dir": "/some/folder"})
    task.check_options({"data_dir": None})


def test_bad_data_dir_fails_the_trial_config_not_the_trial() -> None:
    with pytest.raises(ConfigError, match=r"^task_options\.data_dir: must be a folder path"):
        TrialConfig(task="pixel_mnist", task_options={"data_dir": 5})


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_real_fashion_mnist_from_the_debian_package() -> None:
    task = PixelMNIST(dataset="fashion_mnist", data_dir=str(FASHION))
    assert [len(task.splits[s][0]) for s in ("train", "val", "test")] == [50_000, 10_000, 10_000]
    assert set(task.splits["test"][1].tolist()) == set(range(10))


def test_a_missing_debian_fashion_mnist_says_which_package_brings_it(monkeypatch) -> None:
    from pathlib import Path

    from study.tasks import mnist_data

    monkeypatch.setattr(mnist_data, "DEBIAN_FASHION_MNIST", "/nonexistent/fashion-mnist")
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        mnist_data.check_data_dir("fashion_mnist", "/nonexistent/fashion-mnist", download=False)
    with pytest.raises(ConfigError) as other:
        mnist_data.check_data_dir("mnist", str(Path("/nonexistent/other")), download=False)
    assert "apt-get" not in str(other.value)
