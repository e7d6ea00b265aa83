"""The trial-process side of a Ray trial: one trial, or a pack trained as one batched model, each
member logging to its own MLflow run and reporting to Tune, with its state saved for a resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from study import pack_runner, pack_state, space, tracking
from study.config import TrialConfig, resolve_precision
from study.switches import switches_set, switches_text
from study.tracking import StudyContext, Tags
from study.tracking.tags import pack_tags
from study.trial import Progress
from study.vocabulary import COMPLETED, DIVERGED, RUNNING


def run_ray_trial(config: dict[str, Any]) -> None:
    """One Ray trial: a trial, or a pack of trials trained as one batched model, with every
    evaluation logged to each trial's MLflow run and reported to Tune."""
    context = StudyContext.from_dict(config["study"])
    # Ray reserves `cpus` cores for the trial; torch would otherwise use every core on the node.
    torch.set_num_threads(max(1, int(context.cpus)))
    node = ray.get_runtime_context().get_node_id()
    ray_trial = tune.get_context().get_trial_name()
    tracker = tracking.open_store(context.tracking_uri)
    members = [
        Member(tracker, context, trial_id, trial_config, tags, node)
        for trial_id, trial_config, tags in members_of(config, ray_trial)
    ]
    state_file = Path(context.trial_states) / f"{ray_trial}.pt"
    packed = "pack" in config

    def report() -> None:
        # After the state is saved: a retry or resume continues from what Tune was told.
        tune.report(_pack_result(members, context.mode) if packed else members[0].result())

    try:
        # The loop `study trial --space` runs too: one way to train a pack and save its state.
        pack_runner.train_members(members, state_file, report, packed)
    except Exception as error:
        for member in members:
            if not member.finished:
                member.run.fail(error)
        raise


def members_of(config: dict[str, Any], ray_trial: str) -> list[tuple[str, TrialConfig, Tags]]:
    """(trial id, config, extra MLflow tags) of each trial a Ray trial runs."""
    if "pack" in config:
        pack = config["pack"]
        tags = pack_tags(pack["id"], pack["size"])
        return [(m["id"], TrialConfig.from_dict(m["config"]), tags) for m in pack["members"]]
    if "nuisance" in config:
        trial_config = space.sample_config(
            config["trial"]["config"],
            config["nuisance"],
            StudyContext.from_dict(config["study"]).task_options,
        )
    else:
        trial_config = TrialConfig.from_dict(config["trial"]["config"])
    return [(ray_trial, trial_config, {})]


def member_ids(config: dict[str, Any], ray_trial: str) -> list[str]:
    """The trial ids a Ray trial runs: its pack's members, or itself."""
    if "pack" in config:
        return [member["id"] for member in config["pack"]["members"]]
    return [ray_trial]


class Member(pack_runner.Member):
    """One trial inside a Ray trial (alone or packed): its MLflow run and what Tune hears of it."""

    def __init__(
        self,
        tracker: tracking.Tracker,
        context: StudyContext,
        trial_id: str,
        config: TrialConfig,
        tags: Tags,
        node: str,
    ) -> None:
        super().__init__(trial_id, config)
        self.metric = context.metric
        self.run = tracking.TrialRun(tracker, context, trial_id, config, tags)
        # Which Ray node ran the trial (the last attempt's, after a retry): shows a study's spread.
        self.run.set_tags({"ray.node_id": node})
        # What it trains on: `device: auto` is resolved on the node, and a curve depends on it;
        # so does the precision, `auto` with it (as a result file's "precision").
        device = pack_runner.device_label(config.device)
        precision = resolve_precision(config.precision, device)
        self.run.set_tags({"device.used": device, "precision.used": precision})
        cells = pack_state.cells_used(config)
        if cells is not None:  # compiled or torch-op LSTM cells: their curves differ in the bits
            self.run.set_tags({"cpu_cells.used": cells})
        forced = switches_set()  # kernels forced by HDETACH_* (study/switches.py)
        if forced:
            self.run.set_tags({"switches.set": switches_text(forced)})

    def record(self, progress: Progress) -> None:
        super().record(progress)
        if progress.status == DIVERGED:
            # A searcher must not rank a diverged trial by its old values.
            self.latest[self.metric] = math.nan
        self.run.log(progress.iteration, progress.metrics)

    def result(self) -> dict[str, Any]:
        # Tune checks that every result holds the searcher's metric.
        return {
            self.metric: math.nan,
            **self.latest,
            "iteration": self.iteration,
            "outcome": self.status,
        }

    def finish(self) -> None:
        self.run.finish(self.status)
        super().finish()


def _pack_result(members: list[Member], mode: str) -> dict[str, Any]:
    """What Tune sees of a pack: its best member's metric, its outcome (running until every
    member has finished) and each member's own result under its trial id."""
    metric = members[0].metric
    values = [member.latest.get(metric, math.nan) for member in members]
    finite = [value for value in values if not math.isnan(value)]
    statuses = {member.status for member in members}
    if RUNNING in statuses:
        outcome = RUNNING
    else:
        outcome = COMPLETED if COMPLETED in statuses else DIVERGED
    result = {
        metric: (max if mode == "max" else min)(finite) if finite else math.nan,
        "iteration": max(member.iteration for member in members),
        "outcome": outcome,
    }
    for member in members:
        result.update({f"{member.trial_id}/{k}": v for k, v in member.result().items()})
    return result
