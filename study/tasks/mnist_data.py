"""MNIST-family images through torchvision: download for users online, an IDX folder offline."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import torch
from torchvision import datasets

from study.errors import ConfigError

DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
# Where Debian's dataset-fashion-mnist puts the IDX files (the smoke variants read them).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# The last VAL_SIZE official training images validate: 0..49,999 train, 50,000..59,999 validate
# (paper Sec. 5.2); the official 10,000 test images test.
VAL_SIZE = 10_000


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hdetach-study" / "datasets"


def check_data_dir(dataset: str, data_dir: str | None, download: bool) -> None:
    """What load_images would refuse about data_dir, found without loading anything: a driver
    checks it once before trials that share its files start (and fail alike, retried)."""
    if data_dir is None or download:
        return
    if not (Path(data_dir) / DATASETS[dataset].__name__ / "raw").is_dir():
        _idx_files(Path(data_dir))


def _idx_files(data_dir: Path) -> dict[str, Path]:
    """The four IDX files (raw or .gz) in a flat folder, or a ConfigError naming the missing."""
    found: dict[str, Path] = {}
    for name in IDX_FILES:
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
    if len(found) < len(IDX_FILES):
        missing = [name for name in IDX_FILES if name not in found]
        if not data_dir.is_dir():
            # The smoke variants read Debian's copy: say where it comes from.
            debian = (
                " (it comes with Debian's package: apt-get install dataset-fashion-mnist)"
                if str(data_dir).rstrip("/") == DEBIAN_FASHION_MNIST
                else ""
            )
            raise ConfigError(
                f"task_options.data_dir: {data_dir} is no folder{debian}; point data_dir at a "
                f"folder holding {', '.join(IDX_FILES)} (raw or .gz), or set download=true to "
                "fetch them"
            )
        raise ConfigError(
            f"task_options.data_dir: {data_dir} lacks {', '.join(missing)} (raw or .gz); "
            f"expected the four files {', '.join(IDX_FILES)}; point data_dir at a folder holding "
            "them or set download=true to fetch them"
        )
    return found


def _stage_idx_folder(dataset: str, data_dir: Path) -> Path:
    """A torchvision root (`ROOT/<Class>/raw/<idx files>`) for a flat folder of IDX files.

    The flat folder may be read-only (Debian puts Fashion-MNIST in /usr/share/datasets), so the
    files are linked or decompressed into a cache folder keyed by the source path.
    """
    found = _idx_files(data_dir)
    key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    root = cache_root() / f"{dataset}-{key}"
    raw = root / DATASETS[dataset].__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in found.items():
        target = raw / name
        # Staged before, and not replaced at the source since: keep (the copy is newer).
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        partial = raw / f".{name}.partial"
        if source.suffix == ".gz":
            with gzip.open(source, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(source, partial)
        partial.replace(target)  # atomic: concurrent trials never read a half-written file
    return root


def load_images(
    dataset: str, data_dir: str | None, download: bool, val_size: int = VAL_SIZE
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images (N, 784) and int64 labels for the train / val / test splits."""
    if dataset not in DATASETS:
        raise ConfigError(
            f"task_options.dataset: unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}"
        )
    cls = DATASETS[dataset]
    if data_dir is not None and (Path(data_dir) / cls.__name__ / "raw").is_dir():
        root = Path(data_dir)  # already torchvision's layout
    elif data_dir is not None and not download:
        root = _stage_idx_folder(dataset, Path(data_dir))
    else:
        root = Path(data_dir) if data_dir is not None else cache_root()
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as error:
        raise ConfigError(
            f"task_options: {dataset} not found in {root} ({str(error).splitlines()[0]}); "
            f"expected {', '.join(IDX_FILES)} (raw or .gz) in data_dir, or set download=true "
            "on a machine with internet"
        ) from None
    except (AssertionError, ValueError, IndexError):  # torchvision's checks of the IDX header
        raise ConfigError(
            f"task_options.data_dir: {data_dir}: the {dataset} files there are not IDX files "
            f"({', '.join(IDX_FILES)}, raw or .gz, as MNIST ships them)"
        ) from None
    images = train.data.reshape(len(train.data), -1)
    if not 0 < val_size < len(images):
        raise ConfigError(
            f"task_options.val_size: must be between 1 and {len(images) - 1} "
            f"(the {dataset} training file holds {len(images)} images), got {val_size}"
        )
    split = len(images) - val_size
    return {
        "train": (images[:split], train.targets[:split]),
        "val": (images[split:], train.targets[split:]),
        "test": (test.data.reshape(len(test.data), -1), test.targets),
    }
