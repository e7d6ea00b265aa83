"""Importing the scripts of benchmarks/ in tests: they import their siblings (lstm_step_cuda,
sweep_measure, ...) as top-level modules, as `python benchmarks/X.py` finds them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_module(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module, its folder on sys.path while it (and what it imports)
    loads."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
