"""The Ray session of a study: attach to a cluster or start a local Ray, quiet Ray's, Tune's and
Optuna's logs, stop on SIGTERM as on Ctrl-C, and shut a Ray of our own down."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import Iterator
from typing import Any

import ray

from study.errors import ConfigError, one_line
from study.runner.preflight import check_ray_address


@contextlib.contextmanager
def ray_session(address: str | None, cpus_per_trial: float) -> Iterator[str | None]:
    """Use the Ray already connected (tests), attach to `address`, or start a local Ray; yields
    the local Ray's session folder (None for a Ray not started here), for study.runner.orphans."""
    _quiet_logs()
    if ray.is_initialized():
        yield None
        return
    if tuple(int(part) for part in ray.__version__.split(".")[:2]) >= (2, 59):
        # Ray 2.59 turns on token authentication, which a local, single-user Ray does not need.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    # Ray's own convention: RAY_ADDRESS names the cluster to use when no flag does.
    flag = "--address" if address is not None else "RAY_ADDRESS"
    address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
    session_dir = None
    if address is not None:
        check_ray_address(address, flag)
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as error:
            reason = one_line(error)
            raise ConfigError(
                f"{flag} {address}: {reason}; expected HOST:PORT of a Ray head"
            ) from None
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(cpus_per_trial))
        # "local": a new Ray of our own, even when a `ray start` cluster runs on this machine.
        with _loopback_only(), _ray_in_process_groups_of_its_own():
            local = ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
        session_dir = local.address_info["session_dir"]
    # A SIGTERM (a scheduler's, `timeout`'s, `kill`'s) stops the study as Ctrl-C does: Tune
    # ends its trials, the summary and the resume line are printed, and the parent run is
    # marked KILLED. Set after ray.init, whose own handler would dump a stack trace and exit.
    previous = signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c)
    try:
        yield session_dir
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()


@contextlib.contextmanager
def _ray_in_process_groups_of_its_own() -> Iterator[None]:
    """Start the local Ray's processes (GCS, raylet, and the workers they start) each in a
    process group of its own, not the driver's. A SIGTERM to the driver's group (`timeout`,
    `kill -- -PGID` of a batch script or of a `setsid study run`) then reaches the driver, whose
    handler stops Tune through a GCS still there; in the driver's group, the GCS died with it,
    and the driver waited 60 s for it and ended with no summary, its runs left RUNNING. They
    still end with the driver (Ray's kernel fate-sharing: PR_SET_PDEATHSIG). Ray has no option
    for it; its one constructor of these processes is services.ConsolePopen, swapped here for
    the ray.init call alone."""
    from ray._private import services

    original = services.ConsolePopen

    class InOwnGroup(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("process_group", 0)  # setpgid(0, 0) in the child (Python 3.11)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = InOwnGroup
    try:
        yield
    finally:
        services.ConsolePopen = original


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """A local Ray on 127.0.0.1 alone. ray.init takes the node's outward address even when told
    _node_ip_address="127.0.0.1" (services.resolve_ip_for_localhost), and its servers and agents
    then listen there and on every interface. Ray's one way to a loopback node is its switch for
    Windows and macOS, where clusters are off by default: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    makes the node's address 127.0.0.1, which the GCS, the raylet, the agents and the workers
    then bind. Ray reads it into ray_constants when imported, so the constant is set too."""
    from ray._private import ray_constants

    saved = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    enabled = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # for the processes it starts
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        if saved is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved


def _quiet_logs() -> None:
    """Our one line per trial is the output; Ray's and Tune's logs stay in their files."""
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Tune's newer console output prints an experiment box even at verbose=0; the legacy one
    # honours it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray").setLevel(logging.ERROR)
    # Tune logs failed trials at ERROR ("Trials did not complete"); our lines already say so.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    # Tune's TensorBoard logger warns "NaN or Inf found in input tensor." for a diverged
    # trial's last report; divergence is an outcome, and our line for the trial says so.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    # Optuna announces each cell's in-memory study ("A new study created in memory ...") at
    # INFO, between our trial lines; its warnings still show.
    logging.getLogger("optuna").setLevel(logging.WARNING)


def _stop_as_on_ctrl_c(signum: int, frame: Any) -> None:
    signal.raise_signal(signal.SIGINT)
