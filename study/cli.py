"""The `study` command: parse flags and dispatch to the module that does the work."""

from __future__ import annotations

import argparse
import os
import sys

from study.cli_common import (
    DEFAULT_OUTPUT,
    Parser,
    add_gpu,
    add_output,
    add_overrides,
    chosen_gpu,
    echo,
    given_path,
    port,
    positive_int,
    study_name,
)
from study.cli_trial import add_trial_parser
from study.errors import ConfigError
from study.pack_layout import NO_GPU
from study.switches import check_switches


def _add_import_parser(commands: argparse._SubParsersAction) -> None:
    imports = commands.add_parser(
        "import", help="make the study of `study trial --space` result files in MLflow"
    )
    imports.add_argument(
        "folders",
        type=given_path,
        nargs="+",
        metavar="DIR",
        help="folders of result files, or files",
    )
    add_output(imports)
    imports.add_argument("--tracking-uri", help="import into this MLflow server instead")
    imports.add_argument(
        "--name", type=study_name, help="the study's name in the store (default: the files')"
    )
    imports.set_defaults(handler=_import)


def _import(args: argparse.Namespace) -> int:
    from study.result_import import import_results

    return import_results(args.folders, args.output, args.tracking_uri, args.name, echo=echo)


def _add_study_parsers(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="print a search space's trials; trains nothing")
    plan.add_argument(
        "space",
        type=given_path,
        nargs="+",
        metavar="SPACE",
        help="search-space YAML file; several, or a folder of them (with --estimate: their total)",
    )
    plan.add_argument("--smoke", action="store_true", help="apply the file's smoke overrides")
    add_overrides(plan)
    plan.add_argument(
        "--commands",
        action="store_true",
        help="print one `study trial --space ... --pack ID` command per pack (a job array's)",
    )
    plan.add_argument(
        "--out",
        type=given_path,
        metavar="DIR",
        help="with --commands: their --out (studies/results/NAME)",
    )
    add_gpu(plan)
    plan.add_argument(
        "--estimate",
        action="store_true",
        help="also print the study's GPU time on --gpu NAME, from its cost table "
        "(benchmarks/results/NAME.json)",
    )
    plan.set_defaults(handler=_plan)

    run = commands.add_parser("run", help="run a search space as a Ray Tune study")
    run.add_argument("space", type=given_path, metavar="SPACE", help="search-space YAML file")
    run.add_argument("--smoke", action="store_true", help="apply the file's smoke overrides")
    add_overrides(run)
    add_output(run)
    run.add_argument("--address", help="attach to this Ray cluster instead of a local Ray")
    run.add_argument("--tracking-uri", help="log to this MLflow server instead of DIR/mlflow.db")
    run.add_argument("--max-concurrent", type=positive_int, metavar="N", help="trials at once")
    add_gpu(run)
    run.set_defaults(handler=_run)

    resume = commands.add_parser("resume", help="continue an interrupted study")
    resume.add_argument(
        "name", type=study_name, metavar="NAME", help="study name (the YAML file's stem)"
    )
    add_output(resume)
    resume.add_argument("--address", help="attach to this Ray cluster instead of a local Ray")
    resume.set_defaults(handler=_resume)

    ls = commands.add_parser("ls", help="list the studies in a store with their trial counts")
    add_output(ls)
    ls.add_argument("--tracking-uri", help="list the studies of this MLflow server instead")
    ls.set_defaults(handler=_ls)

    ui = commands.add_parser("ui", help="open the MLflow UI for a study folder on 127.0.0.1")
    add_output(ui)
    ui.add_argument("--port", type=port, default=5000, metavar="P")
    ui.set_defaults(handler=_ui)


def _plan(args: argparse.Namespace) -> int:
    from study.space import make_plan, plan_text, plans_total
    from study.spec import load_spec, space_files

    files = space_files(args.space)
    if len(files) > 1:
        for flag, given in (("--commands", args.commands), ("--name", args.name)):
            if given:
                raise ConfigError(f"{flag}: one SPACE at a time ({len(files)} given)")
    specs = [
        load_spec(f, smoke=args.smoke, overrides=args.overrides, name=args.name) for f in files
    ]
    gpu = chosen_gpu(args.gpu)
    if args.commands:
        if args.estimate:
            raise ConfigError("--estimate: not with --commands (it follows the plan's text)")
        from study.pack_runner import pack_commands

        spec = specs[0]
        # Under the study folder's default, never the shipped results/ (results/quick is there:
        # its jobs would find every trial finished, trained elsewhere).
        out = args.out or DEFAULT_OUTPUT / "results" / spec.name
        print("\n".join(pack_commands(spec, out, gpu)))
        return 0
    if args.out is not None:
        raise ConfigError("--out: only with --commands (the folder their trials write to)")
    if args.estimate and gpu is None:
        why = "--gpu none names no GPU" if args.gpu == NO_GPU else "no CUDA device here"
        raise ConfigError(f"--estimate: {why} to estimate for; name a GPU with --gpu NAME")
    plans = [make_plan(spec, gpu) for spec in specs]
    if not args.estimate:
        print("\n\n".join(plan_text(plan) for plan in plans))
        if len(plans) > 1:
            print(f"\n{plans_total(plans)}")
        return 0
    from study import cost_text, costs  # the cost tables: read only for an estimate

    # Every estimate before any plan's text: a GPU without a cost table is one line alone.
    estimates = [costs.estimate(plan, gpu.key) for plan in plans]
    alone = len(plans) == 1
    print(
        "\n\n".join(
            f"{plan_text(plan)}\n{cost_text.describe(result, alone)}"
            for plan, result in zip(plans, estimates, strict=True)
        )
    )
    if not alone:
        print(f"\n{cost_text.studies_text(costs.Studies(tuple(estimates)))}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from study.spec import load_spec

    # Bad input fails before Ray starts.
    spec = load_spec(args.space, smoke=args.smoke, overrides=args.overrides, name=args.name)
    from study.runner import run_study

    return run_study(
        spec,
        args.output,
        address=args.address,
        tracking_uri=args.tracking_uri,
        max_concurrent=args.max_concurrent,
        echo=echo,
        gpu=chosen_gpu(args.gpu),
    )


def _resume(args: argparse.Namespace) -> int:
    from study.runner import resume_study

    return resume_study(args.name, args.output, address=args.address, echo=echo)


def _ls(args: argparse.Namespace) -> int:
    from study.console import ls_table
    from study.tracking import has_store, list_studies, sqlite_path, store_exists, store_uri

    if args.tracking_uri is None and not has_store(args.output):
        print(f"no studies in {args.output} (no mlflow.db there)")
        return 0
    if args.tracking_uri is not None and not args.tracking_uri.strip():
        raise ConfigError(
            "--tracking-uri: empty; give sqlite:///PATH, http://HOST:PORT or a database URI"
        )
    flag = "--tracking-uri" if args.tracking_uri else f"--output {args.output}"
    uri = args.tracking_uri or store_uri(args.output)
    summaries = list_studies(uri, flag)
    if not summaries and not store_exists(uri):  # a sqlite:/// file not there: said, not made
        print(f"no studies: no MLflow database at {sqlite_path(uri)} (not there, or empty)")
        return 0
    print(ls_table(summaries) if summaries else "no studies")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from study.console import serve_ui

    return serve_ui(args.output, args.port, echo=echo)


def _add_report_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="robustness report of a study, read from MLflow")
    report.add_argument(
        "name", type=study_name, metavar="NAME", help="study name (the YAML file's stem)"
    )
    add_output(report)
    report.add_argument("--tracking-uri", help="read this MLflow server instead of DIR/mlflow.db")
    report.set_defaults(handler=_report)

    scorecard = commands.add_parser(
        "scorecard", help="every claim of every study in a store, on one page, logged to MLflow"
    )
    add_output(scorecard)
    scorecard.add_argument(
        "--tracking-uri", help="read this MLflow server instead of DIR/mlflow.db"
    )
    scorecard.set_defaults(handler=_scorecard)


def _report(args: argparse.Namespace) -> int:
    from study.analysis.report import write_report

    write_report(args.name, args.output, args.tracking_uri)
    return 0


def _scorecard(args: argparse.Namespace) -> int:
    from study.analysis.scorecard import write_store_scorecard

    write_store_scorecard(args.output, args.tracking_uri)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="study", description="h-detach robustness studies")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_trial_parser(commands)
    _add_study_parsers(commands)
    _add_report_parser(commands)
    _add_import_parser(commands)
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
