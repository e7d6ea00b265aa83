"""say_once: tell the user about a fallback (no compiler, no CUDA graph, no Triton) once."""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger(__name__)
_said: set[str] = set()


def say_once(message: str, warn: bool = False) -> None:
    """Log (or warn about) a fallback once per process, however many trials hit it."""
    if message in _said:
        return
    _said.add(message)
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        log.info(message)
