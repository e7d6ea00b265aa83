"""Result files: one JSON file per trial trained outside Ray (`study trial --space`), with what
`study import` (study/result_import.py) needs to rebuild its MLflow run; written, read and
checked here, every problem one line naming the file. Torch-, Ray- and MLflow-free."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study import provenance
from study.config import TrialConfig, resolve_precision
from study.errors import ConfigError, one_line
from study.pack_layout import GpuModel
from study.space import gpu_from_record, gpu_record
from study.spec_checks import name_problem
from study.switches import switches_set
from study.vocabulary import COMPLETED, DIVERGED, FAILED, RUNNING

FORMAT = "hdetach-study trial result"
# Bumped on any change a reader must know of; a reader refuses versions it does not know rather
# than import a curve it may misread.
FORMAT_VERSION = 1
STATUSES = (COMPLETED, DIVERGED, FAILED, RUNNING)
FINAL = (COMPLETED, DIVERGED)  # a trial that is done: trained again, it gives the same curve
TRIAL_FILE = re.compile(r"t\d{4,}\.json")
# JSON has no NaN or infinity (Python writes them, jq and browsers refuse them): a diverged
# point's values are written as these strings.
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class ResultError(ConfigError):
    """A result file that cannot be used; its message is one line naming the file."""


@dataclass(frozen=True)
class StudyInfo:
    """The study a trial belongs to, as its result file names it: enough to rebuild the plan."""

    name: str
    space_hash: str  # StudySpec.spec_hash(): the study's parent run's study.spec_hash tag
    space_yaml: str  # StudySpec.to_yaml(): the resolved space, smoke and --set applied
    source: str  # the YAML file it was loaded from
    smoke: bool
    overrides: tuple[tuple[str, Any], ...]  # the --set pairs, in order
    base_iterations: int | None  # the file's full budget (StudySpec.base_iterations)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "space_hash": self.space_hash,
            "space_yaml": self.space_yaml,
            "source": self.source,
            "smoke": self.smoke,
            "overrides": [list(pair) for pair in self.overrides],
            "base_iterations": self.base_iterations,
        }


@dataclass
class TrialRecord:
    """One trial's result file."""

    study: StudyInfo
    trial_id: str
    pack_id: str
    pack_size: int  # the pack's planned size, as the study.pack_size tag of a packed study
    roles: dict[str, str]  # as the role.<param> tags
    config: TrialConfig
    status: str  # completed | diverged | failed | running (at its last evaluation)
    curve: list[dict[str, float]]  # one point per evaluation: iteration and the metrics
    device: str  # as the device.used tag: cpu, or cuda:0 (NVIDIA H200)
    error: str = ""  # why it failed
    timings: dict[str, Any] = field(default_factory=dict)
    command: str = ""  # the `study trial --space` command that trained it (and continues it)
    machine: dict[str, Any] = field(default_factory=dict)  # versions, CPU, GPU, threads
    git_commit: str | None = None
    # The GPU `resources.pack: auto` sized the study's packs for (None: none): an import plans
    # the same packs from it.
    plan_gpu: GpuModel | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    @property
    def last_iteration(self) -> int:
        return int(self.curve[-1]["iteration"]) if self.curve else 0

    @property
    def precision_used(self) -> str:
        """What the trial computed in (config.precision resolved on its device: `auto` is
        tf32 on CUDA, every value fp32 on a CPU), as the precision.used tag."""
        return resolve_precision(self.config.precision, self.device)

    def budget(self) -> dict[str, Any]:
        """The iterations planned, and their share of the space's full budget."""
        base = self.study.base_iterations
        fraction = self.config.iterations / base if base else None
        return {"iterations": self.config.iterations, "base": base, "fraction": fraction}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "study": self.study.to_json(),
            "trial_id": self.trial_id,
            "pack_id": self.pack_id,
            "pack_size": self.pack_size,
            "status": self.status,
            "error": self.error,
            "config": self.config.to_dict(),
            "roles": self.roles,
            "device": self.device,
            "precision": self.precision_used,  # the config keeps the value asked for
            "budget": self.budget(),
            "timings": self.timings,
            "command": self.command,
            "git_commit": self.git_commit,
            "machine": self.machine,
            "plan_gpu": gpu_record(self.plan_gpu),
            "curve": [{k: _finite_or_text(v) for k, v in point.items()} for point in self.curve],
        }


def machine_info(device: Any) -> dict[str, Any]:
    """Where a trial ran: versions, CPU model, torch threads, the LSTM cells on a CPU and the
    GPU (on CUDA). A curve is bit-identical on one machine type with the same threads and
    cells; CPU and GPU types, and library versions, shift it."""
    import torch  # the caller trains with it already; this module stays torch-free otherwise

    from study.models import cpu_cells

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hdetach_study": provenance.version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        # compiled (lstm_cells.c) or torch ops: the last bits of exp differ between them.
        "cpu_cells": cpu_cells.implementation(device),
        "switches": switches_set(),  # HDETACH_* kernel choices forced in the environment
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(index)
    return info


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def trial_path(folder: Path, trial_id: str) -> Path:
    return folder / f"{trial_id}.json"


def record_text(record: TrialRecord) -> str:
    """The file's text: a line per field and per curve point, so a diff shows what changed."""
    values = record.to_json()
    curve = values.pop("curve")
    lines = [f"  {json.dumps(key)}: {_compact(value)}," for key, value in values.items()]
    points = [f"    {_compact(point)}" for point in curve]
    lines.append('  "curve": [' + ("\n" + ",\n".join(points) + "\n  ]" if points else "]"))
    return "{\n" + "\n".join(lines) + "\n}\n"


def write_record(folder: Path, record: TrialRecord) -> Path:
    """Write (or replace) the trial's file in one step: a killed writer never leaves half."""
    path = trial_path(folder, record.trial_id)
    partial = folder / f".{record.trial_id}.{os.getpid()}.partial"
    partial.write_text(record_text(record))
    os.replace(partial, path)
    return path


def read_record(path: Path) -> TrialRecord:
    """A result file, checked; ResultError (one line naming the file) if it cannot be used."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ResultError(f"{path}: cannot read ({error.strerror or one_line(error)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultError(f"{path}: damaged, not JSON ({one_line(error)})") from None
    try:
        return _parse(values, path)
    except ResultError:
        raise
    except ConfigError as error:
        raise ResultError(f"{path}: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ResultError(f"{path}: damaged ({one_line(error)})") from None


def result_files(folder: Path) -> list[Path]:
    """The trial files of a folder (t0000.json ...), in trial order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and TRIAL_FILE.fullmatch(p.name))


def check_same_study(record: TrialRecord, name: str, space_hash: str, path: Path) -> None:
    """ResultError unless the record is of study `name` with the space of hash `space_hash`."""
    study = record.study
    if study.name != name:
        raise ResultError(f"{path}: belongs to study {study.name}, not {name}")
    if study.space_hash != space_hash:
        raise ResultError(
            f"{path}: from another space (hash {study.space_hash}, this study's is "
            f"{space_hash}): the study's YAML, --smoke or --set differ"
        )


def _parse(values: Any, path: Path) -> TrialRecord:
    if not isinstance(values, dict) or values.get("format") != FORMAT:
        if (
            isinstance(values, dict)
            and "format" not in values
            and {"config", "curve"} <= set(values)
        ):
            raise ResultError(
                f"{path}: a one-trial `study trial` result, of no study: only the files of "
                "`study trial --space SPACE` belong to a study and import"
            )
        raise ResultError(f"{path}: not a trial result file (no format {FORMAT!r})")
    version = values.get("format_version")
    if version != FORMAT_VERSION:
        raise ResultError(
            f"{path}: result format version {version!r} is unknown here (this hdetach-study "
            f"reads version {FORMAT_VERSION}); import it with the version that wrote it"
        )
    study = _mapping(_field(values, "study"), "study")
    base = _field(study, "base_iterations", "study.")
    name = _text(_field(study, "name", "study."), "study.name")
    problem = name_problem(name)  # it names the study's folders, as --name does
    if problem:
        raise ValueError(f"study.name: {problem}")
    info = StudyInfo(
        name=name,
        space_hash=_text(_field(study, "space_hash", "study."), "study.space_hash"),
        space_yaml=_text(_field(study, "space_yaml", "study."), "study.space_yaml"),
        source=_text(_field(study, "source", "study."), "study.source"),
        smoke=bool(_field(study, "smoke", "study.")),
        overrides=_overrides(_field(study, "overrides", "study.")),
        base_iterations=None if base is None else _integer(base, "study.base_iterations"),
    )
    status = _field(values, "status")
    if status not in STATUSES:
        raise ResultError(f"{path}: status {status!r} unknown; allowed: {', '.join(STATUSES)}")
    trial_id = _text(_field(values, "trial_id"), "trial_id")
    curve = _list(_field(values, "curve"), "curve")
    if path.name != f"{trial_id}.json":
        raise ResultError(f"{path}: holds trial {trial_id}, so it must be named {trial_id}.json")
    record = TrialRecord(
        study=info,
        trial_id=trial_id,
        pack_id=_text(_field(values, "pack_id"), "pack_id"),
        pack_size=_integer(_field(values, "pack_size"), "pack_size"),
        roles={str(k): str(v) for k, v in _mapping(_field(values, "roles"), "roles").items()},
        config=_config(_field(values, "config")),
        status=status,
        curve=[_point(point, n) for n, point in enumerate(curve)],
        device=_text(_field(values, "device"), "device"),
        error=_optional_text(values.get("error"), "error") or "",
        timings=dict(_mapping(values.get("timings") or {}, "timings")),
        command=_optional_text(values.get("command"), "command") or "",
        machine=_machine(values.get("machine") or {}),
        git_commit=_optional_text(values.get("git_commit"), "git_commit"),
        plan_gpu=gpu_from_record(values.get("plan_gpu")),  # absent from files before issue 18
    )
    steps = [int(point["iteration"]) for point in record.curve]
    if steps != sorted(set(steps)):
        raise ResultError(f"{path}: curve: iterations must increase, got {steps}")
    iterations = record.config.iterations
    # A trial's last evaluation is at its last iteration: a completed curve that ends before it
    # was cut, and would stay cut (an import never revisits a completed trial).
    cut = status == COMPLETED and steps[-1:] != [iterations]
    if cut or (record.finished and not steps) or (steps and steps[-1] > iterations):
        raise ResultError(
            f"{path}: status {status} but the curve ends at {steps[-1] if steps else 'none'} "
            f"of its {iterations} iterations"
        )
    return record


def _config(values: Any) -> TrialConfig:
    if not isinstance(values, dict):
        raise ValueError(f"config: expected a mapping, got {values!r}")
    try:
        return TrialConfig.from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"config: {error}") from None


def _field(values: dict[str, Any], name: str, prefix: str = "") -> Any:
    """values[name]; a file without it names the field (a bare KeyError named only the key)."""
    if name not in values:
        raise ValueError(f"{prefix}{name}: missing")
    return values[name]


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a mapping, got {_short(value)}")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{name}: expected a list, got {_short(value)}")
    return value


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: expected text, got {value!r}")
    return value


def _overrides(value: Any) -> tuple[tuple[str, Any], ...]:
    pairs = _list(value, "study.overrides")
    if not all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
               for pair in pairs):  # fmt: skip
        raise ValueError(f"study.overrides: expected [key, value] pairs, got {_short(value)}")
    return tuple((key, item) for key, item in pairs)


def _machine(value: Any) -> dict[str, Any]:
    """Where it ran; the fields an import tags the runs with are checked (a list there would
    reach MLflow's database and fail mid-import)."""
    machine = dict(_mapping(value, "machine"))
    _optional_text(machine.get("cpu_cells"), "machine.cpu_cells")
    switches = _mapping(machine.get("switches") or {}, "machine.switches")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in switches.items()):
        raise ValueError(f"machine.switches: expected names and values as text, got {switches}")
    return machine


def _optional_text(value: Any, name: str) -> str | None:
    """A field a file may leave out or null (error, command, git_commit); str() would have
    turned a list or a number there into text that reads as real."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: expected text or null, got {_short(value)}")
    return value


def _point(point: Any, number: int) -> dict[str, float]:
    if not isinstance(point, dict) or "iteration" not in point:
        raise ValueError(f"curve point {number}: expected a mapping with an iteration")
    parsed: dict[str, float] = {}
    for key, value in point.items():
        if isinstance(value, str) and value in NONFINITE:
            value = NONFINITE[value]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"curve point {number}: {key} is not a number ({value!r})")
        if isinstance(value, int) and abs(value) > sys.float_info.max:  # float() would overflow
            raise ValueError(f"curve point {number}: {key} is too large for a float")
        parsed[str(key)] = value
    iteration = parsed["iteration"]
    # A training iteration is a whole number >= 0 (0: a curve's point before any step); int()
    # would have made 100.5 into 100 and hidden the damage.
    if not (math.isfinite(iteration) and float(iteration).is_integer() and iteration >= 0):
        raise ValueError(
            f"curve point {number}: iteration must be a whole number >= 0 ({iteration!r})"
        )
    parsed["iteration"] = int(iteration)
    return parsed


def _finite_or_text(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _compact(value: Any) -> str:
    # Python's float repr round-trips: the value read back is the value written, bit for bit.
    return json.dumps(value, separators=(", ", ": "), allow_nan=False)
