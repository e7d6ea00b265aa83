"""The README's flow end to end: the quick study (smoke, 2 seeds), then its report in Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from analysis_fixtures import CHROMIUM, screenshot

from study.analysis.figures import curves_figure
from study.analysis.load import load_study
from study.analysis.stats import analyse

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def study_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_quick_study_report_renders_with_every_seed_curve(tmp_path: Path) -> None:
    # quick.yaml itself, its smoke overrides kept but with 2 seeds so "every seed" means more
    # than one line per panel.
    spec = yaml.safe_load((REPO / "search_spaces" / "quick.yaml").read_text())
    spec["smoke"]["replicates"] = {"seeds": 2}
    space = tmp_path / "quick.yaml"
    space.write_text(yaml.safe_dump(spec))
    output = tmp_path / "studies"

    ran = study_cli("run", str(space), "--smoke", "--output", str(output))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "4 completed" in ran.stdout and "study ui --output" in ran.stdout
    reported = study_cli("report", "quick", "--output", str(output))
    assert reported.returncode == 0, reported.stdout + reported.stderr
    report_dir = output / "reports" / "quick"
    assert f"report: {report_dir / 'index.html'}" in reported.stdout

    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["counts"]["completed"] == 4
    assert sorted((c["method"], c["n"]) for c in summary["cells"]) == [
        ("h_detach", 2),
        ("none", 2),
    ]
    # The curves figure draws one line per seed in each method's panel.
    figure = curves_figure(analyse(load_study("quick", f"sqlite:///{output}/mlflow.db")),
                           summary["cells"][0]["task"])  # fmt: skip
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert len(panels) == 2
    for ax in panels:
        seed_lines = [line for line in ax.get_lines() if line.get_label().startswith("seed")]
        assert len(seed_lines) == 2, [line.get_label() for line in ax.get_lines()]

    if CHROMIUM is None:  # CI installs it; elsewhere the flow above is still checked
        pytest.skip("no chromium binary: the report's screenshot is not checked")
    shot = tmp_path / "report.png"
    screenshot(report_dir / "index.html", shot, width=1280, height=3000)
    image = matplotlib.image.imread(shot)
    assert (image[..., :3].mean(axis=-1) < 0.9).mean() > 0.02  # text, tables and figures
