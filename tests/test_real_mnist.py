"""A pixel-MNIST smoke study on the real MNIST (../shared/data/mnist beside the checkout, as in
this repository's CI), through `study run --set` and `study report`: the data path end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

MNIST = Path(os.environ.get("HDETACH_MNIST_DIR", REPO.parent / "shared" / "data" / "mnist"))
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip


def _study(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from study.cli import main; sys.exit(main())"]
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not all((MNIST / name).is_file() for name in FILES),
    reason=f"no real MNIST at {MNIST} (this repository's CI has it in ../shared/data/mnist; "
    "elsewhere set HDETACH_MNIST_DIR to a folder with the four IDX files)",
)
def test_pixel_mnist_smoke_study_on_real_mnist(tmp_path):
    space = REPO / "search_spaces" / "paper" / "fig4_pixel_mnist_no_clip.yaml"
    overrides = ["task.dataset=mnist", f"task.data_dir={MNIST}", "replicates.seeds=1"]
    sets = [arg for pair in overrides for arg in ("--set", pair)]
    name = "fig4-real-mnist"
    run = _study("run", str(space), "--smoke", *sets, "--name", name, "--output", "out",
                 cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{name}: 2 trials: 2 completed" in run.stdout
    report = _study("report", name, "--output", "out", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "reports" / name / "summary.json").read_text())
    assert [claim["id"] for claim in summary["claims"]] == [
        "fig4-no-clip-divergence",
        "fig4-no-clip-accuracy",
    ]
    # One seed per method: the claims cannot be decided, and the report says why.
    assert {claim["verdict"] for claim in summary["claims"]} == {"inconclusive"}
    assert summary["overrides"][0] == ["task.dataset", "mnist"]
    assert all(0.0 <= run["best"] <= 1.0 for run in summary["runs"])
