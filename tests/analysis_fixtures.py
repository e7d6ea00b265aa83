"""Synthetic studies for the analysis tests, written into a real MLflow SQLite store."""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from study.analysis.load import Trial

BUDGET = 1000
EVAL_EVERY = 100
CHROMIUM = next(
    (
        path
        for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
        if path
    ),
    None,
)


def make_trial(
    trial_id: str,
    acc: Sequence[float],
    *,
    method: str = "none",
    p_detach: float = 0.0,
    lr: float = 1.0e-3,
    clip_norm: float | None = 1.0,
    seed: int = 0,
    state: str = "completed",
    test_at_best: float = math.nan,
    error: str = "",
    T: int = 100,
    extra_params: dict[str, str] | None = None,
) -> Trial:
    """A trial record whose val accuracy `acc[i]` was evaluated at iteration 100 * (i + 1)."""
    steps = np.arange(1, len(acc) + 1, dtype=np.int64) * EVAL_EVERY
    params = {
        "task": "copying",
        "task_options.T": str(T),
        "method": method,
        "p_detach": str(p_detach),
        "lr": str(lr),
        "clip_norm": "none" if clip_norm is None else str(clip_norm),
        "seed": str(seed),
        "batch_size": "100",
        "hidden_size": "128",
        "iterations": str(BUDGET),
        "eval_every": str(EVAL_EVERY),
        "optimizer": "adam",
        "anneal_last": "none",
        "device": "cpu",
        **(extra_params or {}),
    }
    return Trial(
        trial_id=trial_id,
        run_id=trial_id,
        state=state,
        task=f"copying T={T}",
        method=method,
        p_detach=p_detach,
        lr=lr,
        clip_norm=clip_norm,
        seed=seed,
        budget=BUDGET,
        val_steps=steps,
        val_acc=np.asarray(acc, dtype=float),
        test_at_best=test_at_best,
        error=error,
        params=params,
    )


def empty_store(tmp_path: Path) -> str:
    """A fresh MLflow SQLite store in tmp_path; returns its tracking URI.

    Creating a store runs MLflow's ~10 s of schema migrations, so it is done once per test
    session and the empty database file copied.
    """
    shutil.copy(_template_db(), tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@functools.cache
def _template_db() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="analysis-mlflow-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


def write_study(
    tmp_path: Path,
    name: str,
    trials: list[Trial],
    *,
    n_trials: int | None = None,
    target: float = 0.99,
    searcher: str = "grid",
    roles: dict[str, str] | None = None,
    parent_tags: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Write the study as the runner does (layout contract of issue 4); (tracking_uri, parent id).

    A trial's test/accuracy is logged as a constant curve equal to its `test_at_best`, if any.
    Failed and running trials keep their curves so far; running ones are left RUNNING.
    """
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    if not (tmp_path / "mlflow.db").exists():
        empty_store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(
        name, artifact_location=(tmp_path / "mlartifacts").as_uri()
    )
    parent = client.create_run(
        experiment_id,
        run_name=name,
        tags={
            "study.name": name,
            "study.kind": "parent",
            "study.n_trials": str(n_trials if n_trials is not None else len(trials)),
            "study.target": str(target),
            "study.spec_hash": "0123abcd",
            "study.version": "0.1.0",
            "study.searcher": searcher,
            **(parent_tags or {}),
        },
    )
    parent_id = parent.info.run_id
    client.log_text(parent_id, f"name: {name}\n", "spec.yaml")
    for trial in trials:
        _write_trial(client, experiment_id, parent_id, name, trial, roles or {})
    client.set_terminated(parent_id, "FINISHED")
    return uri, parent_id


def _write_trial(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    name: str,
    trial: Trial,
    roles: dict[str, str],
) -> None:
    tags = {
        "mlflow.parentRunId": parent_id,
        "study.name": name,
        "study.kind": "trial",
        "study.trial_id": trial.trial_id,
        "task": trial.params["task"],
        "method": trial.method,
        "seed": str(trial.seed),
        "role.method": "scientific",
        "role.p_detach": "scientific",
        "role.lr": "nuisance",
        "role.clip_norm": "nuisance",
        "role.seed": "replicate",
        "role.hidden_size": "fixed",
        **{f"role.{param}": role for param, role in roles.items()},
    }
    if trial.state in ("completed", "diverged"):
        tags["outcome"] = trial.state
    if trial.state == "failed":
        tags["error"] = trial.error
    run = client.create_run(experiment_id, run_name=trial.trial_id, tags=tags)
    now = int(time.time() * 1000)
    metrics = []
    for i, (step, acc) in enumerate(zip(trial.val_steps, trial.val_acc, strict=True)):
        step = int(step)
        loss = math.nan if trial.state == "diverged" and i == len(trial.val_acc) - 1 else 1 - acc
        metrics += [
            Metric("val/accuracy", float(acc), now, step),
            Metric("val/loss", 1.0 - float(acc), now, step),
            Metric("train/loss", loss, now, step),
            Metric("train/grad_norm", 1.0, now, step),
            Metric("best/val_accuracy", float(np.max(trial.val_acc[: i + 1])), now, step),
        ]
        if not math.isnan(trial.test_at_best):
            metrics.append(Metric("test/accuracy", trial.test_at_best, now, step))
    params = [Param(key, value) for key, value in trial.params.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    status = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED"}
    if trial.state in status:
        client.set_terminated(run.info.run_id, status[trial.state])


def grid(
    curves: dict[tuple[str, float], dict[tuple[float, float | None], list[list[float]]]],
) -> list[Trial]:
    """Trials for {(method, p): {(lr, clip): [acc curve per seed]}}, ids t0000, t0001, ..."""
    trials = []
    for (method, p_detach), cells in curves.items():
        for (lr, clip), seeds in cells.items():
            for seed, acc in enumerate(seeds):
                trials.append(
                    make_trial(
                        f"t{len(trials):04d}",
                        acc,
                        method=method,
                        p_detach=p_detach,
                        lr=lr,
                        clip_norm=clip,
                        seed=seed,
                    )
                )
    return trials


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 4000) -> None:
    """Render a local HTML file in headless Chromium (as root: no sandbox) into a PNG."""
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tempfile.mkdtemp(dir=png.parent)}", f"--screenshot={png}",
            f"--window-size={width},{height}", page.resolve().as_uri(),
        ],
        check=True, capture_output=True, timeout=90,
    )  # fmt: skip
