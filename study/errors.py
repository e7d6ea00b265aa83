"""The user-facing error type, one-line error text and checks of paths and servers; imports
nothing of ours, so every module of `study/` may use it without a cycle."""

from __future__ import annotations

import os
import socket
from pathlib import Path


class ConfigError(ValueError):
    """A bad value in a config, flag or YAML file; its message is one line meant for the user."""


def one_line(error: BaseException | str) -> str:
    """An error as one line: its type and the first line of its message (text as given)."""
    if isinstance(error, str):
        text = error.strip().splitlines()[0].strip() if error.strip() else "unknown error"
        return text[:1000]
    message = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {message[0].strip()}" if message else type(error).__name__
    return text[:1000]


def check_reachable(what: str, host: str, port: int, hint: str) -> None:
    """One TCP connection to a server the user named (an MLflow server, a Ray head): a one-line
    error now, instead of the client library's minutes of retries and a traceback."""
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"{what}: cannot connect to {host}:{port} ({reason}); {hint}") from None


def absolute(path: Path | str) -> Path:
    """The path made absolute with `..` and `.` taken out, as the shell reads them: the same
    folder given as `../studies` and as `/x/studies` must make the same store URI (and
    artifact location), or a later command would take one store for two."""
    return Path(os.path.abspath(path))


def make_folder(path: Path, flag: str) -> None:
    """mkdir -p for a folder the user named with `flag`: a one-line error if it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"{flag} {path}: cannot make this folder ({reason})") from None
