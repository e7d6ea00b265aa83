"""What every `study` subcommand shares: the one-line-error parser, argument types (study
names, folders, ports) and the --output, --set and --gpu flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from study.errors import ConfigError
from study.pack_layout import KNOWN_GPUS, NO_GPU, GpuModel  # no torch there
from study.spec_checks import name_problem


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block) and exit status 2.

    A flag's help may be filled in only when help is shown (lazy_help): the task and method
    registries import torch, which `study plan` or `study --help` need not wait for.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy_help: dict[argparse.Action, Callable[[], str]] = {}

    def lazy_help(self, action: argparse.Action, help_text: Callable[[], str]) -> None:
        self._lazy_help[action] = help_text

    def format_help(self) -> str:
        for action, help_text in self._lazy_help.items():
            action.help = help_text()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


DEFAULT_OUTPUT = Path("studies")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def port(text: str) -> int:
    # 0 (any free port) is refused too: `study ui` prints its URL before mlflow binds.
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1..65535, got {text!r}")
    return value


def given_path(text: str) -> Path:
    """A path argument, refused when empty: Path("") is ".", the working folder, which the
    user never named (`study plan ""` would plan every space there)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return Path(text)


def study_folder(text: str) -> Path:
    # In DIR/mlflow.db's sqlite:/// URI, SQLAlchemy reads them as query, fragment or escapes: the
    # database would land elsewhere (".../run #1?x=1" -> the file ".../run #1").
    if any(mark in text for mark in "?#%"):
        raise argparse.ArgumentTypeError(f"{text!r}: a study folder's path may not hold ?, # or %")
    if Path(text).exists() and not Path(text).is_dir():  # every command that takes --output
        raise argparse.ArgumentTypeError(f"{text!r}: a file, not a study folder (of mlflow.db...)")
    return Path(text)


def study_name(text: str) -> str:
    """A study's name, not its YAML file (a likely slip: `study run` takes the file)."""
    path = Path(text)
    if text.strip() and (path.suffix in (".yaml", ".yml") or "/" in text):
        example = f" (here: {path.stem})" if path.suffix in (".yaml", ".yml") else ""
        raise argparse.ArgumentTypeError(
            f"expected a study name, the YAML file's stem{example}, got the path {text!r}"
        )
    problem = name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        type=study_folder,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help="study folder: DIR/mlflow.db, DIR/mlartifacts, DIR/ray (default: ./studies)",
    )


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one value of the space by its dotted key (repeatable), e.g. "
        "fixed.iterations=20000 (scientific.lr=[0.01,0.001] moves lr from fixed to a grid); "
        "the study is then named FILE-set-HASH unless --name",
    )
    parser.add_argument("--name", type=study_name, help="the study's name (default: from SPACE)")


def echo(line: str) -> None:
    print(line, flush=True)


LOCAL_GPU = "local"  # --gpu: this machine's CUDA device


def gpu_name(text: str) -> str:
    """A --gpu value: a GPU pack_layout knows by name, `local`, or `none`."""
    allowed = [*KNOWN_GPUS, LOCAL_GPU, NO_GPU]
    if text not in allowed:
        raise argparse.ArgumentTypeError(f"unknown GPU {text!r}; allowed: {', '.join(allowed)}")
    return text


def add_gpu(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu",
        type=gpu_name,
        metavar="NAME",
        help=f"the GPU that sizes `resources.pack: auto`: {', '.join(KNOWN_GPUS)}, local "
        "(this machine's; the default where there is a CUDA device, else auto plans packs of 1) "
        "or none (packs of 1, as without a GPU)",
    )


def chosen_gpu(name: str | None) -> GpuModel | None:
    """The pack_layout.GpuModel that --gpu NAME names: a known GPU, this machine's CUDA device
    (`local`, the default where there is one), or None (`none`, or no --gpu and no GPU here)."""
    if name == NO_GPU:
        return None
    if name is not None and name != LOCAL_GPU:
        return KNOWN_GPUS[name]
    import torch  # torch only to look for a local GPU; the spec's checks import it anyway

    if not torch.cuda.is_available():
        if name == LOCAL_GPU:
            known = ", ".join(KNOWN_GPUS)
            raise ConfigError(f"--gpu local: torch sees no CUDA device here; name one: {known}")
        return None
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    # Its name's key where the SM count is the known GPU's (an H100 PCIe has 114, not 132).
    key = next(
        (
            known.key
            for known in KNOWN_GPUS.values()
            if known.key in properties.name.lower()
            and known.sms == properties.multi_processor_count
        ),
        LOCAL_GPU,
    )
    return GpuModel(key, properties.name, properties.multi_processor_count)
