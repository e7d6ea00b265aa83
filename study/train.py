"""train(config, report) -> TrialResult: one trial, free of Ray and MLflow."""

from __future__ import annotations

import math
from typing import Any

from study.config import TrialConfig
from study.packed_train import train_packed
from study.trial import Progress, Reporter, TrialResult, TrialState, resolve_device
from study.vocabulary import COMPLETED, DIVERGED, RUNNING


def train(
    config: TrialConfig, report: Reporter | None = None, resume_from: dict[str, Any] | None = None
) -> TrialResult:
    """Run one trial to its iteration budget, calling `report` after every evaluation.

    `train/loss` and `train/grad_norm` are means over the iterations since the previous
    evaluation. A non-finite loss or gradient norm ends the trial as `diverged` (an outcome of the
    study, not a crash) with one last report holding the offending values.
    """
    device = resolve_device(config.device)
    if device.type == "cuda":
        # On a GPU one trial is a pack of one: the same graphed, sync-free training step.
        return train_packed([config], [report], [resume_from])[0]
    trial = TrialState(config, device)
    if resume_from is not None:
        trial.load(resume_from)

    def send(status: str, point: dict[str, float]) -> None:
        if report is not None:
            metrics = {k: v for k, v in point.items() if k != "iteration"}
            report(Progress(trial.iteration, metrics, status, trial.checkpoint))

    loss_sum = norm_sum = 0.0
    window = 0
    while trial.iteration < config.iterations:
        loss_value, norm_value = trial.step()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            point = {
                "iteration": trial.iteration,
                "train/loss": loss_value,
                "train/grad_norm": norm_value,
            }
            trial.curve.append(point)
            send(DIVERGED, point)
            return TrialResult(config, DIVERGED, trial.curve)
        loss_sum += loss_value
        norm_sum += norm_value
        window += 1
        if trial.iteration % config.eval_every == 0 or trial.iteration == config.iterations:
            point = trial.evaluate_point(loss_sum / window, norm_sum / window)
            trial.curve.append(point)
            loss_sum = norm_sum = 0.0
            window = 0
            send(COMPLETED if trial.iteration == config.iterations else RUNNING, point)
    return TrialResult(config, COMPLETED, trial.curve)
