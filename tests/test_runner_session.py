"""The Ray session: RAY_ADDRESS names the cluster when no --address does, and says so if wrong."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import free_port, tiny_copying, write_space
from runner_fixtures import STUDY, without_ray_address


def test_an_address_from_ray_address_is_named_so(tmp_path: Path) -> None:
    closed = free_port()
    path = write_space(tmp_path, "env", tiny_copying())
    ran = subprocess.run(
        [STUDY, "run", str(path), "--output", str(tmp_path / "out")],
        env={**without_ray_address(), "RAY_ADDRESS": f"127.0.0.1:{closed}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 2
    assert ran.stderr.startswith(f"study run: error: RAY_ADDRESS 127.0.0.1:{closed}: cannot ")
    assert ran.stderr.count("\n") == 1
