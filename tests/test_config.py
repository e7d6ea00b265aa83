"""TrialConfig: YAML-style coercion and one-line, field-named errors."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from study.config import TrialConfig, check_schedule, resolve_precision
from study.errors import ConfigError, check_reachable


def test_yaml_strings_and_nulls_are_coerced() -> None:
    config = TrialConfig.from_dict({"lr": "1e-4", "clip_norm": None, "seed": 3.0})
    assert config.lr == 1e-4 and config.clip_norm is None and config.seed == 3
    fraction = TrialConfig.from_dict({"anneal_fraction": "6.5e-2", "anneal_last": None})
    assert fraction.anneal_fraction == 0.065 and TrialConfig().anneal_fraction is None


@pytest.mark.parametrize(
    "values,message",
    [
        ({"p_detach": 1.5, "method": "h_detach"}, "p_detach: must be in [0, 1]"),
        ({"lr": 0}, "lr: must be > 0"),
        ({"lr": 1e38}, "lr: must be > 0 and at most 1e+36 (larger steps overflow float32"),
        ({"lr": float("inf")}, "lr: must be > 0 and at most 1e+36"),
        ({"lr": "fast"}, "lr: must be a number"),
        ({"clip_norm": False}, "clip_norm: must be a number or null"),
        ({"task": "sorting"}, "task: unknown task 'sorting'; allowed: copying"),
        ({"method": "z_detach"}, "method: unknown method 'z_detach'; allowed: none"),
        ({"seed": 1.5}, "seed: must be an integer"),
        ({"batch_size": 0}, "batch_size: must be >= 1"),
        ({"learning_rate": 1}, "unknown field(s) learning_rate"),
        ({"task_options": {"T": 0}}, "task_options.T: must be >= 1"),
        ({"task_options": {"length": 5}}, "unknown option(s) length for task copying"),
        ({"method": "none", "p_detach": 0.5}, "method none never detaches"),
        ({"precision": "fp16"}, "precision: must be fp32, tf32 or auto, got 'fp16'"),
        ({"anneal_fraction": 1.0}, "anneal_fraction: must be in [0, 1) or null (no annealing)"),
        ({"anneal_fraction": -0.1}, "anneal_fraction: must be in [0, 1) or null"),
        ({"anneal_fraction": "nan"}, "anneal_fraction: must be in [0, 1) or null"),
        ({"anneal_fraction": True}, "anneal_fraction: must be a number or null"),
        (
            {"anneal_fraction": 0.1, "anneal_last": 5},
            "anneal_fraction: set it or anneal_last, not both (got anneal_last 5 and",
        ),
    ],
)
def test_bad_values_name_the_field(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        TrialConfig.from_dict(values)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_precision_defaults_to_auto_tf32_on_cuda_and_fp32_elsewhere() -> None:
    assert TrialConfig().precision == "auto"
    assert TrialConfig.from_dict({"precision": "auto"}).precision == "auto"
    resolved = {
        (value, device): resolve_precision(value, device)
        for value in ("auto", "fp32", "tf32")
        for device in ("cuda", "cpu")
    }
    assert resolved == {
        ("auto", "cuda"): "tf32",  # as cuDNN's LSTM in PyTorch
        ("auto", "cpu"): "fp32",
        ("fp32", "cuda"): "fp32",
        ("fp32", "cpu"): "fp32",
        ("tf32", "cuda"): "tf32",
        ("tf32", "cpu"): "fp32",  # a CPU has no TF32
    }
    assert resolve_precision("auto", "cuda:0 (NVIDIA H200)") == "tf32"  # a device.used label


def test_round_trip_through_dict() -> None:
    config = TrialConfig(task_options={"T": 7}, method="c_detach", p_detach=0.5, clip_norm=None)
    assert TrialConfig.from_dict(config.to_dict()) == config


def test_check_reachable_names_what_and_where_in_one_line() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_reachable("--x", "127.0.0.1", port, "hint")
    # Closed now: nothing listens there.
    with pytest.raises(ConfigError) as error:
        check_reachable("--x http://h", "127.0.0.1", port, "is it running?")
    message = str(error.value)
    assert message.startswith(f"--x http://h: cannot connect to 127.0.0.1:{port} (")
    assert message.endswith("; is it running?") and "\n" not in message


def test_make_folder_names_the_flag_and_the_reason(tmp_path: Path) -> None:
    from study.errors import make_folder

    make_folder(tmp_path / "a" / "b", "--output")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^--output .*file/sub: cannot make this folder \(Not"):
        make_folder(tmp_path / "file" / "sub", "--output")


def test_a_schedule_that_anneals_the_whole_run_is_refused() -> None:
    # anneal_last >= iterations: h-detach's name on a plain LSTM's curve.
    whole = TrialConfig(method="h_detach", p_detach=0.25, iterations=1000, anneal_last=1000)
    with pytest.raises(ConfigError, match=r"anneal_last: must be < iterations \(1000\)"):
        check_schedule(whole)
    assert check_schedule(dataclasses.replace(whole, anneal_last=999)).anneal_last == 999
    # Vanilla never detaches: nothing to anneal, nothing to refuse.
    assert check_schedule(TrialConfig(iterations=1000, anneal_last=5000)).anneal_last == 5000
