"""Typed trial configuration and input checks, with field-named one-line errors (YAML: spec.py)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from study.errors import ConfigError
from study.vocabulary import parse_clip


@dataclass(frozen=True)
class TrialConfig:
    """Everything that decides one trial's curve. Field names are the YAML keys and the flags."""

    task: str = "copying"
    # Constructor arguments of the task class, e.g. {"T": 100} or {"dataset": "fashion_mnist"}.
    task_options: dict[str, Any] = field(default_factory=dict)
    method: str = "none"
    # Probability of *detaching* at a step (paper Algorithm 1; the authors' code uses the same p).
    p_detach: float = 0.0
    # Authors' scripts switch h-detach off for the last epochs; here: the last N iterations,
    # or (anneal_fraction) that share of the budget, which scales with it: the authors' 39 of
    # 600 copying epochs is 0.065 (study.methods.annealed_iterations). At most one of the two.
    anneal_last: int | None = None
    anneal_fraction: float | None = None
    hidden_size: int = 128
    optimizer: str = "adam"
    lr: float = 1.0e-3
    batch_size: int = 100
    # Global gradient-norm clip; None means no clipping (the robustness axis of the paper).
    clip_norm: float | None = 1.0
    seed: int = 0
    iterations: int = 1000
    eval_every: int = 100
    device: str = "cpu"
    # fp32; tf32: on CUDA, matmuls (and the Triton LSTM kernels) may use TF32 tensor cores, as
    # cuDNN's nn.LSTM does by default in PyTorch; auto: tf32 on CUDA, fp32 elsewhere, resolved
    # where the device is known (resolve_precision). CPUs always compute in fp32, so on a CPU
    # every value gives the same curve, bit for bit.
    precision: str = "auto"

    def __post_init__(self) -> None:
        validate_trial_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "") -> TrialConfig:
        """Build from a plain dict (YAML, JSON, Ray param_space); `where` prefixes errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{_prefix(where)}unknown field(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        coerced = {key: _coerce(key, value, where) for key, value in values.items()}
        return cls(**coerced)

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)


# Field types for casting YAML scalars; spec.py validates search spaces with the same sets.
FLOAT_FIELDS = ("p_detach", "anneal_fraction", "lr", "clip_norm")
INT_FIELDS = ("anneal_last", "hidden_size", "batch_size", "seed", "iterations", "eval_every")
# null means off: no clipping, no annealing
NULLABLE_FIELDS = ("clip_norm", "anneal_last", "anneal_fraction")
PRECISIONS = ("fp32", "tf32", "auto")
# Adam's first step is lr / (1 - 0.9) per unit, passed to torch as a float32 scalar (max 3.4e38).
MAX_LR = 1e36


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _coerce(key: str, value: Any, where: str) -> Any:
    """Cast YAML's loose scalars: PyYAML reads `1e-4` as a string and `off` as False."""
    if value is None:
        return None
    if key in FLOAT_FIELDS:
        if isinstance(value, bool):
            raise ConfigError(f"{_prefix(where)}{key}: must be a number or null, got {value!r}")
        try:
            return parse_clip(value) if key == "clip_norm" else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{_prefix(where)}{key}: must be a number, got {value!r}") from None
    if key in INT_FIELDS:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{_prefix(where)}{key}: must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            message = f"{_prefix(where)}{key}: must be an integer, got {value!r}"
            raise ConfigError(message) from None
    if key == "task_options":
        if not isinstance(value, dict):
            raise ConfigError(f"{_prefix(where)}task_options: must be a mapping, got {value!r}")
        return dict(value)
    return value


def resolve_precision(precision: str, device: str) -> str:
    """The precision a trial computes in on `device` (a torch device type or name, or a
    device.used label such as "cuda:0 (NVIDIA H200)"): `auto` is tf32 on CUDA, the default of
    cuDNN's LSTM in PyTorch (issue 18: the paper spaces' fp32 single pixel-MNIST trial was
    3.4x a cuDNN step), and a CPU computes in fp32 whatever the value (it has no TF32)."""
    if not device.startswith("cuda"):
        return "fp32"
    return "tf32" if precision == "auto" else precision


def check_schedule(config: TrialConfig) -> TrialConfig:
    """The config, once its evaluation schedule is one a user meant: an eval_every beyond
    iterations evaluates once, at the end, without a word. Checked where users write configs
    (a search space, `study trial` flags), not in every TrialConfig: code and saved states may
    hold such a config, and train() handles it."""
    if config.eval_every > config.iterations:
        raise ConfigError(
            f"eval_every: must be <= iterations ({config.iterations}), got {config.eval_every} "
            "(it would evaluate only once, at the end)"
        )
    if config.method != "none" and (config.anneal_last or 0) >= config.iterations:
        # Annealing covers the whole run: the method's name on a plain LSTM's curve.
        raise ConfigError(
            f"anneal_last: must be < iterations ({config.iterations}) for method "
            f"{config.method}, got {config.anneal_last} (it would never detach); "
            "anneal_fraction scales with the budget"
        )
    return config


def validate_trial_config(config: TrialConfig) -> None:
    """Raise ConfigError naming the first bad field and what is allowed."""
    # Imported on first use: the registries bring torch, this module does not (`study --help`
    # stays fast). study.registry imports nothing of config, so there is no cycle.
    from study.registry import check_registered

    check_registered(config.task, config.method, config.task_options)
    if not 0.0 <= config.p_detach <= 1.0:
        raise ConfigError(f"p_detach: must be in [0, 1], got {config.p_detach}")
    if config.method == "none" and config.p_detach != 0.0:
        raise ConfigError(
            f"p_detach: method none never detaches, so p_detach must be 0, got {config.p_detach}"
        )
    if not 0 < config.lr <= MAX_LR:
        raise ConfigError(
            f"lr: must be > 0 and at most {MAX_LR:g} (larger steps overflow float32 in the "
            f"optimizer), got {config.lr}"
        )
    if config.clip_norm is not None and not config.clip_norm > 0:
        raise ConfigError(f"clip_norm: must be > 0 or null (no clipping), got {config.clip_norm}")
    if config.clip_norm == math.inf:
        # It clips nothing, as null does, yet it would be logged as a setting of its own.
        raise ConfigError("clip_norm: must be finite, got inf; null is no clipping")
    if config.optimizer not in ("adam", "sgd"):
        raise ConfigError(f"optimizer: must be adam or sgd, got {config.optimizer!r}")
    for name in ("hidden_size", "batch_size", "iterations", "eval_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(config, name)}")
    if config.anneal_last is not None and config.anneal_last < 0:
        raise ConfigError(f"anneal_last: must be >= 0 or null, got {config.anneal_last}")
    if config.anneal_fraction is not None:
        if config.anneal_last is not None:
            raise ConfigError(
                f"anneal_fraction: set it or anneal_last, not both (got anneal_last "
                f"{config.anneal_last} and anneal_fraction {config.anneal_fraction}); null is off"
            )
        if not 0.0 <= config.anneal_fraction < 1.0:
            raise ConfigError(
                f"anneal_fraction: must be in [0, 1) or null (no annealing), "
                f"got {config.anneal_fraction}"
            )
    if config.precision not in PRECISIONS:
        allowed = ", ".join(PRECISIONS[:-1]) + f" or {PRECISIONS[-1]}"
        raise ConfigError(f"precision: must be {allowed}, got {config.precision!r}")
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", config.device):
        raise ConfigError(f"device: must be cpu, cuda, cuda:N or auto, got {config.device!r}")
