"""The sweep's handle on its measuring children (benchmarks/sweep_measure.py processes).

Each child runs in its own process group, so that one spinning in a kernel whose programs wait
on each other forever can be killed whole; an answer that does not come within its time, or a
child that exits, is a ChildLost, and Runner starts a fresh child for the next request. On
SIGTERM (gpu_check.sh's stage `timeout`) or Ctrl-C, stop_children kills every child still
running: the signal does not reach their process groups, and a hung one would hold the GPU for
the next stage.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sweep_measure import MESSAGE

REPO = Path(__file__).resolve().parent.parent
MEASURE = Path(__file__).resolve().parent / "sweep_measure.py"


class ChildLost(Exception):
    """The child died or stopped answering; the next request starts a fresh one."""


LIVE: set[Child] = set()  # the children still running, for stop_children


class Child:
    """A sweep_measure process and the answers it prints (other lines pass through, labelled)."""

    def __init__(self, device: str, label: str = "") -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, str(MEASURE), "--device", device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: a hung child is killed whole
        )
        LIVE.add(self)
        self.label = label
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """The reading thread: owns the child's stdout until it ends (the child exited)."""
        assert self.process.stdout is not None
        with self.process.stdout as lines:
            for line in lines:
                if line.startswith(MESSAGE):
                    self.answers.put(json.loads(line[len(MESSAGE) :]))
                else:
                    print(f"{self.label}{line}", end="", flush=True)
        self.answers.put(None)

    def receive(self, timeout: float) -> dict[str, Any]:
        try:
            answer = self.answers.get(timeout=max(timeout, 1.0))
        except queue.Empty:
            self.kill()
            raise ChildLost(f"no answer within {timeout:.0f} s (killed)") from None
        if answer is None:
            code = self.process.wait()
            raise ChildLost(f"the measuring process exited with code {code}")
        return answer

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except OSError:
            code = self.process.wait()
            raise ChildLost(f"the measuring process exited with code {code}") from None
        return self.receive(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._close_stdin()
        LIVE.discard(self)

    def close(self) -> None:
        """End the child as it should end: its input closed, it exits; killed after 30 s."""
        self._close_stdin()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        LIVE.discard(self)

    def _close_stdin(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:  # the child is gone and the pipe broken: nothing left to close
                pass


def stop_children(signum: int, frame: object) -> None:
    """On SIGTERM (a stage's `timeout`) or Ctrl-C: kill the children, whose own process groups
    the signal does not reach (one spinning in a kernel would hold the GPU for the next stage)."""
    for child in list(LIVE):
        child.kill()
    sys.exit(128 + signum)


class Runner:
    """Sends requests to one child at a time; a lost child is replaced on the next request."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.child: Child | None = None
        self.hello: dict[str, Any] = {}

    def start(self, timeout: float) -> dict[str, Any]:
        """A fresh child (the last one, if any, ended first) and its hello."""
        self._drop()
        self.child = Child(self.device)
        self.hello = self.child.receive(timeout)
        return self.hello

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The child's answer, or {"error": why} when the child was lost (then replaced)."""
        try:
            if self.child is None or self.child.process.poll() is not None:
                self.start(timeout=120)
            assert self.child is not None
            return self.child.ask(request, timeout)
        except ChildLost as lost:
            self._drop()
            return {"error": str(lost)}

    def _drop(self) -> None:
        """Forget the current child, killed if it still runs, its pipe to it closed."""
        if self.child is not None:
            self.child.kill()
            self.child = None

    def close(self) -> None:
        if self.child is not None:
            self.child.close()
