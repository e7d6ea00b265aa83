"""Checks before a study starts, each a one-line error instead of trials that fail or wait for
ever: its data here, an earlier study of its name, the GPUs it asks of Ray, a Ray address."""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import ray

from study import space
from study.errors import ConfigError, check_reachable
from study.invocation import program
from study.runner.state import recorded_store
from study.space import Plan
from study.spec import AUTO_GPUS, StudySpec
from study.tasks import TASKS
from study.tracking import open_store, store_label, store_uri
from study.tracking.stores import DRIVER_LOCK
from study.tracking.tags import IMPORTED_TAG


def check_data_here(plan: Plan) -> None:
    """The task's data check for each distinct set of task options the study trains with: a
    wrong data_dir fails every trial alike, each after Ray's retries."""
    spec = plan.spec
    if plan.optuna:
        configs = [space.cell_config(spec, cell, {}) for cell in plan.cells]
    else:
        configs = [trial.config for trial in plan.trials]
    checked = set()
    for config in configs:
        options = json.dumps(config.task_options, sort_keys=True)
        if options not in checked:
            checked.add(options)
            try:
                TASKS[spec.task].check_data(config.task_options)
            except ConfigError as error:
                raise ConfigError(f"{spec.source}: {error}") from None


def refuse_existing(spec: StudySpec, output: Path, uri: str, store_exists: bool) -> None:
    """A new study must not meet an old one of its name: in the MLflow store (its runs), or in
    the output folder's Ray state (whose saved trial states would pass for this study's)."""
    # A sqlite:/// file not there yet holds no study; opening it would create it.
    parent = open_store(uri).find_parent(spec.name) if store_exists else None
    if parent is not None:
        where = f"study {spec.name} already exists in {store_label(uri)}"
        # A store of the folder's own is left by another --output; a server's keeps the name.
        elsewhere = "into another --output or " if uri == store_uri(output) else ""
        new = f"{elsewhere}as another study with --name NEW"
        if parent.tags.get("study.spec_hash") != spec.spec_hash():
            # `study resume` would continue that other search space, not this one.
            smoke = " (its smoke variant)" if parent.tags.get("study.smoke") == "true" else ""
            raise ConfigError(
                f"{where}, from a different search space{smoke}; run this one {new} "
                "(study resume continues the existing one)"
            )
        if parent.tags.get(IMPORTED_TAG) == "true":
            # Made from result files: no Ray state, so no `study resume`.
            raise ConfigError(
                f"{where}, made by `study import` (no Ray state for `study resume`); train its "
                f"pending trials with its `study trial --space` commands (`study plan "
                f"{spec.source} --commands`), then `study import` their folder, or run this one "
                f"{new}"
            )
        # resume reads the store from the study.json of the folder the study ran into.
        same = recorded_store(output / "ray" / spec.name) == uri
        folder = shlex.quote(str(output)) if same else "DIR"
        ran_with = "" if same else " (DIR: the --output it ran with)"
        resume = f"{program()} resume {spec.name} --output {folder}"
        raise ConfigError(f"{where}; continue it with `{resume}`{ran_with}, or run this one {new}")
    ray_state = output / "ray" / spec.name
    # Only the driver lock there: a run that stopped before its study began (a store error).
    if ray_state.exists() and (
        not ray_state.is_dir() or {p.name for p in ray_state.iterdir()} - {DRIVER_LOCK}
    ):
        # No readable study.json: the folder alone is reason enough.
        earlier = recorded_store(ray_state)
        logged = f", logged to {store_label(earlier)}" if earlier is not None else ""
        raise ConfigError(
            f"study {spec.name}: {ray_state} holds the Ray state of an earlier run{logged}; "
            f"continue it with `{program()} resume {spec.name} --output "
            f"{shlex.quote(str(output))}`, or remove that folder, or run into another --output"
        )


def gpus_per_trial(spec: StudySpec) -> float:
    """resources.gpus, with "auto" resolved against the connected Ray cluster: one GPU per
    trial (or pack) where it has GPUs, none where it has none (trials with `device: auto`
    then train on the CPU)."""
    if spec.resources.gpus != AUTO_GPUS:
        return float(spec.resources.gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def check_gpus(spec: StudySpec, address: str | None, echo: Callable[[str], None]) -> None:
    """Say what `gpus: auto` resolved to, and refuse what Ray cannot give: such trials would wait
    for ever, silently (Ray's warning goes to its log). On a cluster an autoscaler may still add
    GPU nodes, so there it only says so."""
    per_trial = gpus_per_trial(spec)
    found = ray.cluster_resources().get("GPU", 0)
    if spec.resources.gpus == AUTO_GPUS:
        echo(f"resources.gpus: auto -> {per_trial:g} per trial (GPUs in Ray: {found:g})")
    cuda = set()
    for axes in (spec.fixed, spec.scientific, spec.nuisance):
        value = axes.get("device", "auto")  # a fixed value, or a grid axis (a list)
        cuda |= {str(v) for v in (value if isinstance(value, list) else [value])}
    cuda -= {"cpu", "auto"}
    if cuda and per_trial == 0:
        if spec.resources.gpus == AUTO_GPUS:
            raise ConfigError(
                f"device: {min(cuda)} needs a GPU, but resources.gpus: auto found none in Ray; "
                "use device: auto (the CPU then) or a Ray cluster with GPUs (--address)"
            )
        raise ConfigError(
            f"device: {min(cuda)} needs resources.gpus >= 1 (Ray gives GPUs only to trials "
            "that ask for them); or device: auto"
        )
    if per_trial > found:
        message = f"resources.gpus: {per_trial:g} per trial, but Ray has {found:g} GPU(s)"
        if address is None and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(f"{message} on this machine; use gpus: auto or 0")
        echo(f"{message}: trials wait for a GPU node")


def check_ray_address(address: str, flag: str = "--address") -> None:
    """HOST:PORT (or ray://HOST:PORT) must accept a connection: ray.init would otherwise retry
    for minutes, printing only Ray's own warnings. "auto" and other forms go to Ray as given."""
    if not address.strip():
        raise ConfigError(f"{flag}: empty; expected HOST:PORT of a Ray head, or no {flag}")
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address)
    if match is not None:
        hint = "is `ray start --head` running there (see docker/README.md)?"
        check_reachable(f"{flag} {address}", match[1], int(match[2]), hint)
