"""Training a pack of trials in this process, resumable from its saved state: the one loop that
the Ray trainable and `study trial --space` share, and the latter's run over a space's packs,
one result file per trial (study.results). No Ray, no MLflow."""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from study import provenance, results
from study.config import TrialConfig
from study.errors import ConfigError, make_folder, one_line
from study.invocation import program
from study.overrides import overrides_hash, overrides_text
from study.pack_layout import NO_GPU, GpuModel
from study.pack_state import StateError, cells_used, load_state, save_state
from study.packed_train import train_packed
from study.results import StudyInfo, TrialRecord
from study.space import Pack, Plan, make_plan
from study.spec import AUTO_PACK, StudySpec
from study.train import train
from study.trial import Progress, Reporter, resolve_device
from study.vocabulary import DIVERGED, FAILED, RUNNING

STATE_FOLDER = ".state"  # in --out: each unfinished pack's state at its last evaluation
Echo = Callable[[str], None]


class Member:
    """One trial of a pack in its trial process: what it reported last and how to save it.

    Subclasses add where the reports go (an MLflow run for Ray, a result file here)."""

    def __init__(self, trial_id: str, config: TrialConfig) -> None:
        self.trial_id = trial_id
        self.config = config
        self.status = RUNNING
        self.iteration = -1
        self.latest: dict[str, Any] = {}
        self.checkpoint: Callable[[], dict[str, Any]] | None = None
        self.finished = False

    def record(self, progress: Progress) -> None:
        self.latest.update(progress.metrics)
        self.iteration, self.status = progress.iteration, progress.status
        self.checkpoint = progress.checkpoint

    def finish(self) -> None:
        self.finished = True

    def saved(self) -> dict[str, Any]:
        """What the pack's state file keeps of this member besides its training state."""
        return {"status": self.status, "iteration": self.iteration, "latest": self.latest}

    def restore(self, saved: dict[str, Any]) -> None:
        self.status, self.iteration = saved["status"], saved["iteration"]
        self.latest = dict(saved["latest"])


def train_members(
    members: Sequence[Member], state_file: Path, after_save: Callable[[], None], packed: bool
) -> None:
    """Train the members still running (a pack with train_packed, a lone trial with train),
    continuing from `state_file`; at each evaluation, once every running member has reported
    it, save every member's state there, then call `after_save`. Members end `finish()`ed.

    A member that diverges is finished at once; the others go on. `after_save` tells the world
    (Tune, a result file) only what a restart from the file would not take back.
    """
    cells = cells_used(members[0].config)  # a pack's members share one device
    saved = load_state(state_file, [member.trial_id for member in members], cells)
    for member in members:
        if member.trial_id in saved:
            member.restore(saved[member.trial_id])
    running = [member for member in members if member.status == RUNNING]
    # Every member finished by the process that saved this state, which then died before it
    # told anyone (a driver killed just then): tell it now, or Tune ends the trial with the
    # last result it had, and `study resume` prints a completed trial as running.
    unreported = bool(saved) and not running

    def save_and_report() -> None:
        nonlocal unreported
        states = {
            member.trial_id: {
                **member.saved(),
                # Finished members are not trained again: their state is not needed.
                "state": member.checkpoint() if member.status == RUNNING else None,
            }
            for member in members
        }
        save_state(state_file, states, cells)
        after_save()
        unreported = False

    def reporter(member: Member) -> Reporter:
        def report(progress: Progress) -> None:
            nonlocal unreported
            member.record(progress)
            unreported = True
            if progress.status == DIVERGED:
                member.finish()  # its record says so now; the others go on
            elif all(
                other.iteration == progress.iteration
                for other in running
                if other.status != DIVERGED
            ):
                save_and_report()

        return report

    resumes = [saved[m.trial_id]["state"] if m.trial_id in saved else None for m in running]
    if running and packed:
        train_packed([m.config for m in running], [reporter(m) for m in running], resumes)
    elif running:
        (member,) = running
        train(member.config, reporter(member), resume_from=resumes[0])
    if unreported:  # every member left diverged between two evaluations
        save_and_report()
    for member in members:
        if not member.finished:
            member.finish()


def device_label(name: str) -> str:
    """The device as the device.used tag and a result file name it: cpu, or e.g.
    cuda:0 (NVIDIA H100 80GB HBM3). `device: auto` is resolved here, and a curve depends on it."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


# --- `study trial --space`: a space's packs in this process, one result file per trial --------


def study_info(spec: StudySpec) -> StudyInfo:
    return StudyInfo(
        name=spec.name,
        space_hash=spec.spec_hash(),
        space_yaml=spec.to_yaml(),
        source=spec.source,
        smoke=spec.smoke,
        overrides=tuple(spec.overrides),
        base_iterations=spec.base_iterations,
    )


def trial_command(
    spec: StudySpec,
    out: Path,
    packs: Sequence[str] = (),
    gpu: GpuModel | None = None,
    trials: Sequence[str] = (),
) -> str:
    """The `study trial --space` command that trains `packs` (or `trials`; all, if neither) of
    the space into `out`, and continues them when run again. A `pack: auto` space's command
    names the GPU the plan was sized for (`--gpu none` where it had none), so that it trains
    the plan's packs on any machine."""
    words = ["study", "trial", "--space", spec.source]
    if spec.smoke:
        words.append("--smoke")
    for pair in spec.overrides:
        words += ["--set", overrides_text([pair])]
    stem = Path(spec.source).stem
    default = f"{stem}-set-{overrides_hash(spec.overrides)}" if spec.overrides else stem
    if spec.name != default:
        words += ["--name", spec.name]
    if spec.resources.pack == AUTO_PACK:
        words += ["--gpu", NO_GPU if gpu is None else gpu.key]
    if packs:
        words += ["--pack", *packs]
    elif trials:
        words += ["--trials", *trials]
    return shlex.join([*words, "--out", str(out)])


def pack_commands(spec: StudySpec, out: Path, gpu: GpuModel | None = None) -> list[str]:
    """One command per pack (`study plan --commands`), e.g. for the tasks of a job array."""
    return [trial_command(spec, out, [pack.pack_id], gpu) for pack in _plan(spec, gpu).packs]


def run_space(
    spec: StudySpec,
    out: Path,
    packs: Sequence[str] = (),
    trials: Sequence[str] = (),
    echo: Echo = print,
    gpu: GpuModel | None = None,
) -> int:
    """Train the chosen packs (or the chosen trials, or all) of the space into `out`; a trial
    whose file there is finished is kept. Exit status: 0 when every chosen trial finished, 1
    when one failed; Ctrl-C and SIGTERM raise KeyboardInterrupt, the state saved stays."""
    plan = _plan(spec, gpu)
    chosen = _choose(plan, packs, trials)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file; with --space, --out names a folder")
    make_folder(out, "--out")
    info = study_info(spec)
    done = _finished_here(out, info, [t.trial_id for _, members in chosen for t in members])
    total = sum(len(members) for _, members in chosen)
    echo(
        f"training {spec.name}{' (smoke)' if spec.smoke else ''}: {total} trials in "
        f"{len(chosen)} packs, {len(done)} finished already; result files in {out}"
    )
    failed = 0
    trained: list[LocalMember] = []
    threads = torch.get_num_threads()
    # As a Ray trial of the study: torch on the cores the space gives each trial, which on a
    # CPU also keeps the curves those of `study run`.
    torch.set_num_threads(max(1, int(spec.resources.cpus)))
    try:
        with _sigterm_as_ctrl_c():
            for pack, planned in chosen:
                # Some of a pack's trials (--trials): their files' command names them, as the
                # state file does, so that it continues them (_train_pack).
                subset = [t.trial_id for t in planned] if len(planned) < len(pack.trials) else []
                command = trial_command(spec, out, [] if subset else [pack.pack_id], gpu, subset)
                members = [
                    LocalMember(
                        t.trial_id, t.config, pack, plan, info, out, command, done.get(t.trial_id)
                    )
                    for t in planned
                ]
                trained += members
                if not all(member.finished for member in members):
                    failed += _train_pack(pack, members, plan, out, echo)
    except KeyboardInterrupt:
        echo(
            f"interrupted: finished trials and each pack's last evaluation are kept in {out}; "
            "the same command continues from there"
        )
        raise
    finally:
        torch.set_num_threads(threads)
    with contextlib.suppress(OSError):  # empty once every pack has finished
        (out / STATE_FOLDER).rmdir()
    counts = {status: sum(m.status == status for m in trained) for status in results.STATUSES}
    shown = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    importing = f"{program()} import {shlex.quote(str(out))}"
    echo(f"{spec.name}: {shown} in {out}; into MLflow with: {importing}")
    return 1 if failed else 0


class LocalMember(Member):
    """A trial trained by `study trial --space`: its curve and timings go to its result file."""

    def __init__(
        self,
        trial_id: str,
        config: TrialConfig,
        pack: Pack,
        plan: Plan,
        info: StudyInfo,
        out: Path,
        command: str,  # the `study trial --space` command that trains (and continues) it
        done: TrialRecord | None,
    ) -> None:
        super().__init__(trial_id, config)
        self.out = out
        self.curve: list[dict[str, float]] = []
        self.seconds = 0.0  # its pack's training wall time, over every session
        self.sessions = 0
        self.started = _now()
        self.session_start = time.perf_counter()
        self.session_seconds = 0.0
        self.record_base = TrialRecord(
            study=info,
            trial_id=trial_id,
            pack_id=pack.pack_id,
            pack_size=len(pack.trials),
            roles=plan.roles,
            config=config,
            status=RUNNING,
            curve=[],
            device=device_label(config.device),
            command=command,
            machine=results.machine_info(resolve_device(config.device)),
            git_commit=provenance.git_commit(),
            plan_gpu=plan.gpu,
        )
        if done is not None:
            self.status, self.curve, self.finished = done.status, done.curve, True

    def begin_session(self) -> None:
        self.sessions += 1
        self.session_start = time.perf_counter()

    def record(self, progress: Progress) -> None:
        super().record(progress)
        self.curve.append({"iteration": progress.iteration, **progress.metrics})
        self.session_seconds = time.perf_counter() - self.session_start

    def saved(self) -> dict[str, Any]:
        timings = {
            "started": self.started,
            "seconds": self.seconds + self.session_seconds,
            "sessions": self.sessions,
        }
        return {**super().saved(), "curve": self.curve, "timings": timings}

    def restore(self, saved: dict[str, Any]) -> None:
        super().restore(saved)
        self.curve = [dict(point) for point in saved["curve"]]
        timings = saved["timings"]
        self.started, self.seconds = timings["started"], timings["seconds"]
        self.sessions += timings["sessions"]

    def write(self, status: str | None = None, error: str = "") -> None:
        timings = {
            "started": self.started,
            "updated": _now(),
            # Wall seconds of the pack's training (its members train together), summed over the
            # sessions it took; evaluations included, start-up not.
            "seconds": round(self.seconds + self.session_seconds, 3),
            "sessions": self.sessions,
            "seconds_per_iteration": _per_iteration(
                self.seconds + self.session_seconds, self.curve
            ),
        }
        record = self.record_base
        record.status, record.error = status or self.status, error
        record.curve, record.timings = self.curve, timings
        results.write_record(self.out, record)

    def finish(self) -> None:
        self.write()
        super().finish()


def _train_pack(pack: Pack, members: list[LocalMember], plan: Plan, out: Path, echo: Echo) -> int:
    """Train one pack's unfinished members; the number that failed."""
    todo = [m for m in members if not m.finished]
    ids = " ".join(m.trial_id for m in todo)
    # Named by the members chosen (the pack, or some of its trials), not by those left: a
    # member finishing between two runs must not hide the others' saved state.
    subset = [m.trial_id for m in members] if len(members) < len(pack.trials) else []
    state_file = out / STATE_FOLDER / ("-".join([pack.pack_id, *subset]) + ".pt")
    total = todo[0].config.iterations
    echo(f"  {pack.pack_id}: training {ids}")
    for member in todo:
        member.begin_session()

    def after_save() -> None:
        for member in todo:
            if not member.finished:
                member.write()
        iteration = max(member.iteration for member in todo)
        best = [m.latest.get("best/val_accuracy", math.nan) for m in todo]
        shown = " ".join(f"{value:.3f}" for value in best)
        seconds = todo[0].seconds + todo[0].session_seconds
        echo(f"  {pack.pack_id}: {iteration}/{total} it, {seconds:.0f} s, best val/acc {shown}")

    try:
        train_members(members, state_file, after_save, packed=plan.packed)
    except (KeyboardInterrupt, SystemExit, StateError):
        raise  # a state it must not continue: refused with every file as it was
    except Exception as error:  # noqa: BLE001 - a trial's crash is recorded, the next pack runs
        reason = one_line(error)
        unfinished = [member for member in todo if not member.finished]
        for member in unfinished:
            member.status = FAILED
            member.write(FAILED, reason)
        echo(f"  {pack.pack_id}: failed: {reason}")
        return len(unfinished)
    state_file.unlink(missing_ok=True)
    for member in todo:
        best = member.latest.get("best/val_accuracy", math.nan)
        echo(f"  {member.trial_id}: {member.status}, best val/accuracy {best:.4f}")
    return 0


def _plan(spec: StudySpec, gpu: GpuModel | None) -> Plan:
    plan = make_plan(spec, gpu)
    if plan.optuna:
        raise ConfigError(
            f"{spec.source}: search.searcher optuna suggests each trial from the ones before, "
            "inside Ray Tune; `study trial --space` trains grid and random spaces (use study run)"
        )
    return plan


def _choose(
    plan: Plan, packs: Sequence[str], trials: Sequence[str]
) -> list[tuple[Pack, list[Any]]]:
    """The packs to train and the members of each: the chosen packs whole, or the chosen
    trials (each in its pack), or everything."""
    if packs:
        by_id = {pack.pack_id: pack for pack in plan.packs}
        unknown = [p for p in packs if p not in by_id]
        if unknown:
            raise ConfigError(f"--pack {unknown[0]}: not in the plan; {_span(list(by_id))}")
        return [(by_id[p], list(by_id[p].trials)) for p in dict.fromkeys(packs)]
    if trials:
        known = {t.trial_id for t in plan.trials}
        unknown = [t for t in trials if t not in known]
        if unknown:
            raise ConfigError(f"--trials {unknown[0]}: not in the plan; {_span(sorted(known))}")
        wanted = set(trials)
        chosen = [(p, [t for t in p.trials if t.trial_id in wanted]) for p in plan.packs]
        return [(pack, members) for pack, members in chosen if members]
    return [(pack, list(pack.trials)) for pack in plan.packs]


def _span(ids: list[str]) -> str:
    return f"the plan has {ids[0]}..{ids[-1]}" if len(ids) > 1 else f"the plan has {ids[0]}"


def _finished_here(out: Path, info: StudyInfo, trial_ids: list[str]) -> dict[str, TrialRecord]:
    """The chosen trials whose result file in `out` is finished. Any file there of another
    study or space, or a damaged one, stops the run before it trains (one line naming the
    file), the chosen trials' or not: the folder is imported as one study."""
    done = {}
    chosen = set(trial_ids)
    for path in results.result_files(out) if out.is_dir() else []:
        record = results.read_record(path)
        try:
            results.check_same_study(record, info.name, info.space_hash, path)
        except results.ResultError as error:
            raise ConfigError(f"--out: {error}; give another --out folder") from None
        if record.finished and record.trial_id in chosen:
            done[record.trial_id] = record
    return done


def _per_iteration(seconds: float, curve: list[dict[str, float]]) -> float | None:
    iterations = int(curve[-1]["iteration"]) if curve else 0
    return round(seconds / iterations, 6) if iterations else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """A scheduler's SIGTERM (Slurm's time limit, preemption, `kill`) stops as Ctrl-C does: the
    state saved at the last evaluation stays, and the same command continues from it."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
