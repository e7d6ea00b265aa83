"""The `study` command: parse flags and dispatch to the module that does the work."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml

from study.config import ConfigError, TrialConfig, make_folder
from study.switches import check_switches


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def _clip_norm(text: str) -> float | None:
    if text.lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or none, got {text!r}") from None


def _add_trial_parser(commands: argparse._SubParsersAction) -> None:
    defaults = TrialConfig()
    trial = commands.add_parser("trial", help="run one trial in this process (no Ray, no MLflow)")
    trial.add_argument(
        "--task", default=defaults.task, help="copying | pixel_mnist | permuted_mnist"
    )
    trial.add_argument(
        "--task-opt",
        action="append",
        type=_task_option,
        default=[],
        metavar="KEY=VALUE",
        help="task constructor option, e.g. T=100, dataset=fashion_mnist, data_dir=DIR",
    )
    trial.add_argument("--method", default=defaults.method, help="none | h_detach | c_detach")
    trial.add_argument("--p-detach", type=float, default=None, help="probability of detaching")
    trial.add_argument("--anneal-last", type=int, default=None, help="no detaching in last N its")
    trial.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    trial.add_argument("--optimizer", default=defaults.optimizer, help="adam | sgd")
    trial.add_argument("--lr", type=float, default=defaults.lr)
    trial.add_argument("--batch-size", type=int, default=defaults.batch_size)
    trial.add_argument("--clip-norm", type=_clip_norm, default=defaults.clip_norm)
    trial.add_argument("--seed", type=int, default=defaults.seed)
    trial.add_argument("--iterations", type=int, default=defaults.iterations)
    trial.add_argument("--eval-every", type=int, default=defaults.eval_every)
    trial.add_argument("--device", default=defaults.device, help="cpu | cuda | auto")
    trial.add_argument(
        "--precision", default=defaults.precision, help="fp32 | tf32 (TF32 matmuls on CUDA)"
    )
    trial.add_argument("--out", type=Path, help="write config, status and curve as JSON here")
    trial.set_defaults(handler=_run_trial)


def _trial_config(args: argparse.Namespace) -> TrialConfig:
    p_detach = args.p_detach
    if p_detach is None:
        p_detach = 0.0 if args.method == "none" else 0.25  # the paper's default p
    try:
        return TrialConfig.from_dict(
            {
                "task": args.task,
                "task_options": dict(args.task_opt),
                "method": args.method,
                "p_detach": p_detach,
                "anneal_last": args.anneal_last,
                "hidden_size": args.hidden_size,
                "optimizer": args.optimizer,
                "lr": args.lr,
                "batch_size": args.batch_size,
                "clip_norm": args.clip_norm,
                "seed": args.seed,
                "iterations": args.iterations,
                "eval_every": args.eval_every,
                "device": args.device,
                "precision": args.precision,
            }
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
        end = "\r" if self.interactive and progress.status == "running" else "\n"
        print(line, end=end, file=sys.stderr, flush=True)


def _check_out(path: Path) -> None:
    """Fail before training when --out cannot be written, so a long run's result is not lost."""
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a folder; give a file path, e.g. {path / 'r.json'}")
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
    config = _trial_config(args)
    if args.out is not None:
        _check_out(args.out)
    from study.train import resolve_device, train  # torch deferred: `--help` stays fast

    bar = _ProgressBar(config.iterations)
    curve: list[dict[str, float]] = []

    def report(progress: Any) -> None:
        # The curve so far, kept here so that Ctrl-C can still save it.
        curve.append({"iteration": progress.iteration, **progress.metrics})
        bar.update(progress)

    started = time.perf_counter()
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
    seconds = time.perf_counter() - started
    final = result.final
    summary = (
        f"{result.status}: {config.task} {config.method} p={config.p_detach:g} "
        f"lr={config.lr:g} clip={config.clip_norm} seed={config.seed} | "
        f"iteration {final.get('iteration', 0)}, "
        f"val/accuracy {final.get('val/accuracy', float('nan')):.4f} "
        f"(best {final.get('best/val_accuracy', float('nan')):.4f})"
    )
    if "test/accuracy" in final:
        summary += f", test/accuracy at best val {final['test/accuracy']:.4f}"
    print(f"{summary} | {seconds:.1f} s")
    if args.out is not None and not _write_out(args.out, result.to_json()):
        return 1
    return 0


DEFAULT_OUTPUT = Path("studies")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    # 0 (any free port) is refused too: `study ui` prints its URL before mlflow binds.
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1..65535, got {text!r}")
    return value


def _study_folder(text: str) -> Path:
    # In DIR/mlflow.db's sqlite:/// URI, SQLAlchemy reads them as query, fragment or escapes: the
    # database would land elsewhere (".../run #1?x=1" -> the file ".../run #1").
    if any(mark in text for mark in "?#%"):
        raise argparse.ArgumentTypeError(f"{text!r}: a study folder's path may not hold ?, # or %")
    return Path(text)


def _study_name(text: str) -> str:
    """A study's name, not its YAML file (a likely slip: `study run` takes the file)."""
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or "/" in text:
        example = f" (here: {path.stem})" if path.suffix in (".yaml", ".yml") else ""
        raise argparse.ArgumentTypeError(
            f"expected a study name, the YAML file's stem{example}, got the path {text!r}"
        )
    return text


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        type=_study_folder,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help="study folder: DIR/mlflow.db, DIR/mlartifacts, DIR/ray (default: ./studies)",
    )


def _add_study_parsers(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="print a search space's trials; trains nothing")
    plan.add_argument("space", type=Path, metavar="SPACE", help="search-space YAML file")
    plan.add_argument("--smoke", action="store_true", help="apply the file's smoke overrides")
    plan.set_defaults(handler=_plan)

    run = commands.add_parser("run", help="run a search space as a Ray Tune study")
    run.add_argument("space", type=Path, metavar="SPACE", help="search-space YAML file")
    run.add_argument("--smoke", action="store_true", help="apply the file's smoke overrides")
    _add_output(run)
    run.add_argument("--address", help="attach to this Ray cluster instead of a local Ray")
    run.add_argument("--tracking-uri", help="log to this MLflow server instead of DIR/mlflow.db")
    run.add_argument("--max-concurrent", type=_positive_int, metavar="N", help="trials at once")
    run.set_defaults(handler=_run)

    resume = commands.add_parser("resume", help="continue an interrupted study")
    resume.add_argument(
        "name", type=_study_name, metavar="NAME", help="study name (the YAML file's stem)"
    )
    _add_output(resume)
    resume.add_argument("--address", help="attach to this Ray cluster instead of a local Ray")
    resume.set_defaults(handler=_resume)

    ls = commands.add_parser("ls", help="list the studies in a store with their trial counts")
    _add_output(ls)
    ls.add_argument("--tracking-uri", help="list the studies of this MLflow server instead")
    ls.set_defaults(handler=_ls)

    ui = commands.add_parser("ui", help="open the MLflow UI for a study folder on 127.0.0.1")
    _add_output(ui)
    ui.add_argument("--port", type=_port, default=5000, metavar="P")
    ui.set_defaults(handler=_ui)


def _plan(args: argparse.Namespace) -> int:
    from study.space import plan_text
    from study.spec import load_spec

    print(plan_text(load_spec(args.space, smoke=args.smoke)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from study.spec import load_spec

    spec = load_spec(args.space, smoke=args.smoke)  # bad input fails before Ray starts
    from study.runner import run_study

    return run_study(
        spec,
        args.output,
        address=args.address,
        tracking_uri=args.tracking_uri,
        max_concurrent=args.max_concurrent,
        echo=_echo,
    )


def _resume(args: argparse.Namespace) -> int:
    from study.runner import resume_study

    return resume_study(args.name, args.output, address=args.address, echo=_echo)


def _ls(args: argparse.Namespace) -> int:
    from study.console import ls_table
    from study.tracking import has_store, list_studies, store_uri

    if args.tracking_uri is None and not has_store(args.output):
        print(f"no studies in {args.output} (no mlflow.db there)")
        return 0
    flag = "--tracking-uri" if args.tracking_uri else f"--output {args.output}"
    summaries = list_studies(args.tracking_uri or store_uri(args.output), flag)
    print(ls_table(summaries) if summaries else "no studies")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from study.tracking import serve_ui

    return serve_ui(args.output, args.port, echo=_echo)


def _add_report_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="robustness report of a study, read from MLflow")
    report.add_argument(
        "name", type=_study_name, metavar="NAME", help="study name (the YAML file's stem)"
    )
    _add_output(report)
    report.add_argument("--tracking-uri", help="read this MLflow server instead of DIR/mlflow.db")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from study.analysis.report import write_report

    write_report(args.name, args.output, args.tracking_uri)
    return 0


def _echo(line: str) -> None:
    print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="study", description="h-detach robustness studies")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_trial_parser(commands)
    _add_study_parsers(commands)
    _add_report_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_switches()  # a mistyped HDETACH_* variable stops here, not inside a trial
        return args.handler(args)
    except ConfigError as error:
        print(f"study {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"study {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `study plan X | head` closed our stdout: point it at /dev/null so the interpreter's
        # final flush does not print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
