"""The local Ray of a study whose driver died (kill -9, a crash): Ray's agents outlive it, and the
next `study run` or `resume` into the folder ends them. A study's Ray is known by its session
folder, recorded next to the study's state; a process belongs to it only if it names that folder
on its command line, or is a `ray::` process holding a file there (its logs)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

RECORD = "ray_session.json"  # in DIR/ray/NAME, next to study.json


def record(experiment_dir: Path, session_dir: str) -> None:
    """Write down the local Ray this driver started, and the driver (pid and start time, so a
    reused pid does not pass for it)."""
    pid = os.getpid()
    entry = {"session_dir": session_dir, "driver_pid": pid, "driver_started": _started(pid)}
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / RECORD).write_text(json.dumps(entry) + "\n")


def end_orphans(ray_dir: Path, echo: Callable[[str], None]) -> int:
    """End the processes of each recorded local Ray in DIR/ray/*/ whose driver is gone; a Ray
    whose driver still runs (another study in the folder, now) is left alone. Returns how many
    processes it ended."""
    ended = 0
    for path in sorted(ray_dir.glob(f"*/{RECORD}")):
        try:
            entry = json.loads(path.read_text())
            session, pid, started = (
                entry["session_dir"],
                entry["driver_pid"],
                entry["driver_started"],
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _started(pid) == started:
            continue  # its driver is alive: a study running now
        leftovers = processes_of(session)
        for leftover in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # SIGKILL: the agents ignore SIGTERM once their raylet is gone.
                os.kill(leftover, signal.SIGKILL)
        _wait_gone(leftovers)
        path.unlink(missing_ok=True)
        if leftovers:
            echo(
                f"ended {len(leftovers)} process(es) left by {path.parent.name}'s killed driver "
                f"(Ray session {Path(session).name})"
            )
        ended += len(leftovers)
    return ended


def processes_of(session_dir: str) -> list[int]:
    """The live processes of the Ray whose session folder is `session_dir`."""
    found = []
    session = session_dir.rstrip("/")
    inside = session + "/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
            if _state(int(entry.name)) in ("Z", "X", None):
                continue
            # Its folder or a file in it as an argument (arguments end with a space here).
            if inside in command or f"{session} " in command:
                found.append(int(entry.name))
            elif command.startswith("ray::") and any(
                os.readlink(fd).startswith(inside) for fd in (entry / "fd").iterdir()
            ):
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, None when there is no such pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[0] if fields else None


def _started(pid: int) -> int | None:
    """The pid's start time (clock ticks since boot), None for no live process."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat; fields here start at field 3


def _wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_started(pid) is not None for pid in pids):
        time.sleep(0.1)
