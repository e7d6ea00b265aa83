"""What the `study` commands show a user: one line per finished trial, the end-of-study and `ls`
tables, and the MLflow UI that `study ui` serves."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from study.errors import ConfigError, absolute
from study.invocation import program
from study.tracking import StudySummary, artifact_dir, check_store, has_store, store_uri
from study.vocabulary import FAILED, OUTCOMES, RUNNING, format_value


def describe(point: dict[str, Any]) -> str:
    """A trial's varied parameters, method first: "h_detach p=0.25 lr=0.003 seed=1"."""
    point = dict(point)
    parts = []
    method = point.pop("method", None)
    p_detach = point.pop("p_detach", None)
    if method is not None:
        parts.append(method if method == "none" else f"{method} p={format_value(p_detach)}")
    elif p_detach is not None:
        parts.append(f"p={format_value(p_detach)}")
    seed = point.pop("seed", None)
    parts.extend(f"{key}={format_value(value)}" for key, value in point.items())
    if seed is not None:
        parts.append(f"seed={seed}")
    return " ".join(parts)


def shorten(text: str, width: int = 120) -> str:
    """A long error cut for a progress line; the end-of-study table shows it whole."""
    return text if len(text) <= width else text[: width - 3] + "..."


def trial_line(
    done: int,
    total: int,
    trial_id: str,
    point: dict[str, Any],
    outcome: str,
    best: float | None,
    seconds: float | None,
    error: str = "",
) -> str:
    """ "[3/8] t0002 h_detach p=0.25 lr=0.003 seed=1: completed, best val/accuracy 0.91 (42 s)"."""
    text = f"[{done}/{total}] {trial_id} {describe(point)}: {outcome}"
    if outcome == FAILED:
        text += f": {shorten(error)}"
    elif best is not None and not math.isnan(best):
        text += f", best val/accuracy {best:.3f}"
    if seconds is not None:
        text += f" ({seconds:.0f} s)"
    return text


def ui_command(output: str | None, tracking_uri: str | None) -> str:
    """How to browse a study: `study ui` for a study folder's own store (tracking_uri None),
    else the server's address, or MLflow's own UI on another SQLite store."""
    if tracking_uri is not None and tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    if tracking_uri is not None:
        return f"{program('mlflow')} ui --backend-store-uri {shlex.quote(tracking_uri)}"
    flags = f" --output {shlex.quote(output)}" if output is not None else ""
    return f"{program()} ui{flags}"


def summary_table(summary: StudySummary) -> str:
    """Trials by outcome and the best validation accuracy per method (best and median over its
    finished trials), then one line per failed trial with its error."""
    rows: dict[str, list[Any]] = {}
    for trial in summary.trials:
        label = trial.method if trial.method == "none" else f"{trial.method} p={trial.p_detach:g}"
        rows.setdefault(label, []).append(trial)
    # "unfinished": started and not done (running now, or interrupted); trials not started
    # yet have no run, so no row: the headline's "pending" counts both.
    header = ("method", "trials", *OUTCOMES, "unfinished", "best val/acc", "median")
    table = [header]
    for label, trials in rows.items():
        accuracies = [
            t.best_val_accuracy
            for t in trials
            if t.state != FAILED and not math.isnan(t.best_val_accuracy)
        ]
        table.append(
            (
                label,
                str(len(trials)),
                *(str(sum(t.state == outcome for t in trials)) for outcome in OUTCOMES),
                str(sum(t.state == RUNNING for t in trials)),
                f"{max(accuracies):.3f}" if accuracies else "-",
                f"{statistics.median(accuracies):.3f}" if accuracies else "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    unfinished = sum(t.state == RUNNING for t in summary.trials)
    started = f" ({unfinished} of them started, unfinished)" if unfinished else ""
    lines = [
        f"{summary.name}: {summary.n_trials} trials: "
        + ", ".join(f"{summary.count(o)} {o}" for o in OUTCOMES)
        + f", {summary.pending} pending{started}"
    ]
    lines.extend(
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in table
    )
    for trial in summary.trials:
        if trial.state == FAILED:
            lines.append(f"  failed {trial.trial_id}: {trial.error or 'no error recorded'}")
    return "\n".join(line.rstrip() for line in lines)


def ls_table(summaries: list[StudySummary]) -> str:
    header = ("study", "trials", *OUTCOMES, "pending")
    table = [header]
    for summary in summaries:
        counts = (str(summary.count(outcome)) for outcome in OUTCOMES)
        table.append((summary.name, str(summary.n_trials), *counts, str(summary.pending)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


def serve_ui(output_dir: Path, port: int, echo: Callable[[str], None] = print) -> int:
    """Run the MLflow UI for the embedded store of `output_dir` on 127.0.0.1 until Ctrl-C or
    SIGTERM, either of which stops the server and its workers (their own process group)."""
    if not has_store(output_dir):
        missing = absolute(output_dir) / "mlflow.db"
        raise ConfigError(f"--output {output_dir}: no MLflow store there ({missing} is missing)")
    # A damaged mlflow.db: one line, as ls and report say it, not the server's tracebacks.
    check_store(store_uri(output_dir), f"--output {output_dir}")
    _check_port_free(port)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store_uri(output_dir),
        "--default-artifact-root", artifact_dir(output_dir).as_uri(),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    server = subprocess.Popen(command, start_new_session=True)
    echo(f"MLflow UI for {output_dir}: http://127.0.0.1:{port}  (Ctrl-C to stop)")
    try:
        return server.wait()  # the server ended by itself
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.returncode is None:  # Ctrl-C or SIGTERM here: stop the server's group
            _stop_group(server)


def _check_port_free(port: int) -> None:
    """`study ui` prints its URL before the server binds: a taken port is said first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server will: a port left in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise ConfigError(
                f"--port {port}: 127.0.0.1:{port} is not free ({reason}); pick another --port"
            ) from None


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server and its workers), then SIGKILL to
    what is left. The server is reaped last: until then its id cannot name another group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, server.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()
