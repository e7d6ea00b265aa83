"""`study trial`: one trial from flags, or the packs of a search space (`--space`), trained in
this process with torch alone (no Ray, no MLflow)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from study.cli_common import (
    add_gpu,
    add_overrides,
    chosen_gpu,
    echo,
    given_path,
    positive_int,
)
from study.config import TrialConfig, check_schedule, resolve_precision
from study.errors import ConfigError, make_folder
from study.vocabulary import RUNNING, parse_clip


def _task_names() -> str:
    from study.tasks import TASKS

    return " | ".join(TASKS)


def _method_names() -> str:
    from study.methods import METHODS

    return " | ".join(METHODS)


def _task_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a non-empty KEY, got {text!r}")
    try:
        # YAML typing, so T=100 is an int and download=true a bool, as in a search-space file.
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        # PyYAML's message spans several lines; one line naming the value is enough here.
        raise argparse.ArgumentTypeError(
            f"{key}: value {value!r} is not valid YAML; allowed: a number, true/false, "
            "a list like [1, 2] or text (in YAML quotes if it holds [ ] { } : #)"
        ) from None


def _task_options(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """--task-opt pairs as a mapping; one given twice is refused (dict() kept the last, unsaid),
    as a YAML file's duplicate key is."""
    options: dict[str, Any] = {}
    for key, value in pairs:
        if key in options:
            raise ConfigError(f"--task-opt {key}: given twice ({options[key]!r}, {value!r})")
        options[key] = value
    return options


def _clip_norm(text: str) -> float | None:
    try:
        return parse_clip(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or none, got {text!r}") from None


class _Unset:
    """The parsed value of a one-trial flag not given on the command line."""

    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()


def _left_out(args: argparse.Namespace, dest: str) -> bool:
    """Whether the one-trial flag `dest` was not given (add_trial_parser's UNSET, or None for
    an append such as --task-opt, whose default is a list)."""
    value = getattr(args, dest)
    return value is UNSET or (value is None and isinstance(args.one_trial[dest], list))


def _one_trial_values(args: argparse.Namespace) -> None:
    """Each one-trial flag not given takes its default."""
    for dest, default in args.one_trial.items():
        if _left_out(args, dest):
            setattr(args, dest, list(default) if isinstance(default, list) else default)


def add_trial_parser(commands: argparse._SubParsersAction) -> None:
    # The fields' defaults, read without building a TrialConfig, whose checks import the
    # registries (torch): `study --help`, `ls` and `ui` need not wait for them.
    defaults = SimpleNamespace(
        **{
            f.name: f.default
            for f in dataclasses.fields(TrialConfig)
            if f.default is not dataclasses.MISSING
        }
    )
    trial = commands.add_parser("trial", help="run one trial in this process (no Ray, no MLflow)")
    trial.lazy_help(trial.add_argument("--task", default=defaults.task), _task_names)
    trial.add_argument(
        "--task-opt",
        action="append",
        type=_task_option,
        default=[],
        metavar="KEY=VALUE",
        help="task constructor option, e.g. T=100, dataset=fashion_mnist, data_dir=DIR",
    )
    trial.lazy_help(trial.add_argument("--method", default=defaults.method), _method_names)
    trial.add_argument("--p-detach", type=float, default=None, help="probability of detaching")
    trial.add_argument("--anneal-last", type=int, default=None, help="no detaching in last N its")
    trial.add_argument(
        "--anneal-fraction",
        type=float,
        default=None,
        help="no detaching in that last share of its",
    )
    trial.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    trial.add_argument("--optimizer", default=defaults.optimizer, help="adam | sgd")
    trial.add_argument("--lr", type=float, default=defaults.lr)
    trial.add_argument("--batch-size", type=int, default=defaults.batch_size)
    trial.add_argument("--clip-norm", type=_clip_norm, default=defaults.clip_norm)
    trial.add_argument("--seed", type=int, default=defaults.seed)
    trial.add_argument("--iterations", type=int, default=defaults.iterations)
    trial.add_argument(
        "--eval-every", type=int, help=f"default: {defaults.eval_every}, or --iterations if fewer"
    )
    trial.add_argument("--device", default=defaults.device, help="cpu | cuda | auto")
    trial.add_argument(
        "--precision",
        default=defaults.precision,
        help="fp32 | tf32 (TF32 matmuls on CUDA) | auto (tf32 on CUDA, fp32 on a CPU)",
    )
    trial.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (default 1, as a study's trial with resources.cpus: 1; the curve's "
        "last bits depend on it)",
    )
    # The one-trial flags: with --space, any of them given is refused, even at its default
    # value (`--device cpu` on a `device: auto` space must not be ignored). Their parsed
    # default is UNSET, so that a flag given is told from one left out; _one_trial_values
    # puts the real defaults back for one trial.
    one_trial = {a.dest: a.default for a in trial._actions if a.dest != "help"}
    for action in trial._actions:
        if action.dest in one_trial:
            # An append (--task-opt) starts from None: argparse appends to no other default.
            action.default = None if isinstance(action, argparse._AppendAction) else UNSET
    trial.add_argument(
        "--space",
        type=given_path,
        metavar="SPACE",
        help="train this search space's packs here instead (no Ray, no MLflow), one result "
        "file per trial in --out DIR; run again, it continues; then `study import DIR`",
    )
    trial.add_argument("--smoke", action="store_true", help="with --space: its smoke variant")
    add_overrides(trial)
    add_gpu(trial)
    chosen = trial.add_mutually_exclusive_group()
    chosen.add_argument("--pack", nargs="+", metavar="ID", help="with --space: only these packs")
    chosen.add_argument("--trials", nargs="+", metavar="ID", help="with --space: only these")
    trial.add_argument(
        "--out",
        type=given_path,
        help="write config, status and curve as JSON here (with --space: the folder of files)",
    )
    trial.set_defaults(handler=_run_trial, one_trial=one_trial)


def _trial_config(args: argparse.Namespace) -> TrialConfig:
    _one_trial_values(args)
    p_detach = args.p_detach
    if p_detach is None:
        p_detach = 0.0 if args.method == "none" else 0.25  # the paper's default p
    eval_every = args.eval_every
    if eval_every is None:  # a short run evaluates at its end, as it always did
        eval_every = min(TrialConfig.eval_every, args.iterations)
    try:
        return check_schedule(
            TrialConfig.from_dict(
                {
                    "task": args.task,
                    "task_options": _task_options(args.task_opt),
                    "method": args.method,
                    "p_detach": p_detach,
                    "anneal_last": args.anneal_last,
                    "anneal_fraction": args.anneal_fraction,
                    "hidden_size": args.hidden_size,
                    "optimizer": args.optimizer,
                    "lr": args.lr,
                    "batch_size": args.batch_size,
                    "clip_norm": args.clip_norm,
                    "seed": args.seed,
                    "iterations": args.iterations,
                    "eval_every": eval_every,
                    "device": args.device,
                    "precision": args.precision,
                }
            )
        )
    except ConfigError as error:
        raise ConfigError(_flag_message(str(error))) from None


def _flag_message(message: str) -> str:
    """Name the command-line flag for a config field: 'p_detach: ...' -> '--p-detach: ...'."""
    field, _, rest = message.partition(":")
    if field.startswith("task_options"):
        return f"--task-opt {field.removeprefix('task_options').lstrip('.')}:{rest}".replace(
            "--task-opt :", "--task-opt:"
        )
    # Only config fields: a train-time message such as 'CUDA: ...' is not a flag.
    if field in {f.name for f in dataclasses.fields(TrialConfig)}:
        return f"--{field.replace('_', '-')}:{rest}"
    return message


class _ProgressBar:
    """One self-rewriting line on stderr, updated at every evaluation."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.interactive = sys.stderr.isatty()

    def update(self, progress: Any) -> None:
        done = progress.iteration
        filled = int(30 * done / self.total)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        metrics = progress.metrics
        line = (
            f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} it "
            f"{rate:.1f} it/s  train/loss {metrics.get('train/loss', float('nan')):.4f}  "
            f"val/accuracy {metrics.get('val/accuracy', float('nan')):.4f}"
        )
        end = "\r" if self.interactive and progress.status == RUNNING else "\n"
        print(line, end=end, file=sys.stderr, flush=True)


def _check_out(path: Path) -> None:
    """Fail before training when --out cannot be written, so a long run's result is not lost."""
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a folder; give a file path, e.g. {path / 'r.json'}")
    if path.is_file() and path.stat().st_size:
        # Writing over it would lose a result (Ctrl-C would even put a partial one in its place).
        raise ConfigError(
            f"--out: {path} exists and is not empty (an earlier result?); give another path, or "
            "delete it first to write there"
        )
    if path.exists():  # a file (or /dev/stdout) that takes writes is enough, whatever its folder
        try:
            with path.open("a"):
                pass
        except OSError as error:
            raise ConfigError(f"--out: cannot write {path} ({error.strerror})") from None
        return
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"--out: {existing} is a file, so it cannot hold {path}")
    make_folder(parent, "--out")  # a new nested folder is fine, as it was
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: cannot write files in {parent} (permission denied)")
    try:
        # os.access says yes to root everywhere, even in /proc: a real file settles it.
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".study-out-"):
            pass
    except OSError as error:
        raise ConfigError(f"--out: cannot write files in {parent} ({error.strerror})") from None


def _write_out(path: Path, result: dict[str, Any]) -> bool:
    """Write the result JSON; if that fails (disk full...), print it on stdout instead."""
    text = json.dumps(result, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        sys.stdout.write(text)
        sys.stdout.flush()
        print(
            f"study trial: error: --out: cannot write {path} ({error.strerror or error}); "
            "the result JSON is on stdout",
            file=sys.stderr,
        )
        return False
    return True


def _run_trial(args: argparse.Namespace) -> int:
    if args.space is not None:
        return _run_trial_space(args)
    space_flags = {
        "--smoke": args.smoke,
        "--set": args.overrides,
        "--name": args.name,
        "--gpu": args.gpu,
        "--pack": args.pack,
        "--trials": args.trials,
    }
    space_only = [flag for flag, value in space_flags.items() if value]
    if space_only:
        raise ConfigError(f"{space_only[0]}: needs --space SPACE (it chooses from a space)")
    config = _trial_config(args)
    if args.out is not None:
        _check_out(args.out)
    import torch  # deferred, as train: `--help` stays fast

    from study import results
    from study.train import resolve_device, train

    bar = _ProgressBar(config.iterations)
    curve: list[dict[str, float]] = []

    def report(progress: Any) -> None:
        # The curve so far, kept here so that Ctrl-C can still save it.
        curve.append({"iteration": progress.iteration, **progress.metrics})
        bar.update(progress)

    started = time.perf_counter()
    threads = torch.get_num_threads()
    # torch's default is every core, and a curve's last bits depend on the thread count: one
    # trial runs as a study's trial with resources.cpus: N does (runner.trainable).
    torch.set_num_threads(args.threads)
    machine = results.machine_info(resolve_device(config.device))
    try:
        result = train(config, report=report)
    except ConfigError as error:
        # Task constructors raise at train time (data_dir...): name the flag, as before training.
        raise ConfigError(_flag_message(str(error))) from None
    except (MemoryError, RuntimeError) as error:
        # torch.OutOfMemoryError (CUDA) is a RuntimeError, as is the CPU allocator's refusal.
        if not isinstance(error, MemoryError) and "alloc" not in str(error).lower():
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"out of memory on {resolve_device(config.device)} ({first}); try a smaller "
            "--hidden-size, --batch-size or sequence length (--task-opt T=...)"
        ) from None
    except KeyboardInterrupt:
        if args.out is not None:
            _write_out(
                args.out, {"config": config.to_dict(), "status": "interrupted", "curve": curve}
            )
        raise  # main prints `interrupted` and exits 130
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    final = result.final
    summary = (
        f"{result.status}: {config.task} {config.method} p={config.p_detach:g} "
        f"lr={config.lr:g} clip={config.clip_norm} seed={config.seed} | "
        f"iteration {final.get('iteration', 0)}, "
        f"val/accuracy {final.get('val/accuracy', float('nan')):.4f} "
        f"(best {_last_finite(result.curve, 'best/val_accuracy'):.4f})"
    )
    if "test/accuracy" in final:
        summary += f", test/accuracy at best val {final['test/accuracy']:.4f}"
    device = resolve_device(config.device)
    # What it computed in (`auto` resolved on the device); the config keeps the value asked for.
    precision = resolve_precision(config.precision, device.type)
    print(f"{summary} | {device.type} {precision}, {seconds:.1f} s")
    output = {**result.to_json(), "precision": precision, "machine": machine}
    if args.out is not None and not _write_out(args.out, output):
        return 1
    return 0


def _last_finite(curve: list[dict[str, float]], key: str) -> float:
    """The key's last finite value: a diverged trial's last point has NaN where its running best
    still stands in the points before."""
    values = [point[key] for point in curve if key in point and math.isfinite(point[key])]
    return values[-1] if values else math.nan


def _run_trial_space(args: argparse.Namespace) -> int:
    """`study trial --space`: the space's packs in this process, no Ray, no MLflow imported."""
    given = [dest for dest in args.one_trial if not _left_out(args, dest)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ConfigError(
            f"{flag}: with --space the space sets every value; change one with --set KEY=VALUE"
        )
    if args.out is None:
        raise ConfigError("--space needs --out DIR, the folder of the trials' result files")
    from study.pack_runner import run_space
    from study.spec import load_spec

    spec = load_spec(args.space, smoke=args.smoke, overrides=args.overrides, name=args.name)
    packs, trials = args.pack or (), args.trials or ()
    return run_space(spec, args.out, packs, trials, echo=echo, gpu=chosen_gpu(args.gpu))
