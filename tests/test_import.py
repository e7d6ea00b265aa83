"""`study import`: result files of `study trial --space` become the study `study run` makes (same
runs, params, tags, metric histories and report), idempotently; refused files change nothing;
the shipped results/ import on a fresh clone."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, tiny_copying, write_space
from mlflow import MlflowClient
from result_fixtures import record

from study import result_import, results, tracking
from study.cli import main
from study.errors import ConfigError
from study.pack_layout import KNOWN_GPUS
from study.pack_runner import run_space
from study.results import ResultError, StudyInfo
from study.space import make_plan
from study.spec import load_spec
from study.tracking.stores import driving
from study.tracking.tags import IMPORTED_TAG, pack_gpu_from_tags

QUICK = REPO / "search_spaces" / "quick.yaml"
# Tags that name a run, a machine or a moment, not what the trial was: they may differ.
ID_TAGS = {"mlflow.parentRunId", "ray.node_id"}


def study_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )


def uri(folder: Path) -> str:
    return tracking.store_uri(folder)


def store_contents(store: str, name: str) -> dict[str, Any]:
    """Everything of a study but ids and times: parent and trial runs' status, params, tags and
    every metric's history (step, value), NaN compared as text."""
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    contents: dict[str, Any] = {}
    for run in runs:
        tags = {k: v for k, v in run.data.tags.items() if k not in ID_TAGS}
        key = tags.get("study.trial_id", "parent")
        assert key not in contents, f"two runs for {key}"
        histories = {
            metric: [
                (m.step, m.value if math.isfinite(m.value) else str(m.value))
                for m in sorted(
                    client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step
                )
            ]
            for metric in run.data.metrics
        }
        contents[key] = {
            "status": run.info.status,
            "name": run.info.run_name,
            "params": run.data.params,
            "tags": tags,
            "metrics": histories,
        }
    return contents


def counts(store: str, name: str) -> tuple[int, int]:
    """(runs, metric points) of a study."""
    contents = store_contents(store, name)
    points = sum(len(h) for run in contents.values() for h in run["metrics"].values())
    return len(contents), points


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny packed space (4 trials, 2 packs) trained into result files."""
    space = write_space(tmp_path, "tiny", tiny_copying(resources={"pack": 2}))
    out = tmp_path / "trials"
    assert run_space(load_spec(space), out, echo=lambda line: None) == 0
    return space, out


def test_import_twice_adds_nothing(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    space, out = trained
    store = tmp_path / "store"
    assert main(["import", str(out), "--output", str(store)]) == 0
    assert "imported tiny: 4 trials added or completed, 0 there already" in capsys.readouterr().out
    first = store_contents(uri(store), "tiny")
    assert counts(uri(store), "tiny") == (5, 4 * 2 * 5)  # parent + 4; 2 evaluations x 5 metrics
    plan = make_plan(load_spec(space))
    for trial in plan.trials:
        run = first[trial.trial_id]
        assert run["status"] == "FINISHED" and run["tags"]["outcome"] == "completed"
        assert run["params"] == tracking.flatten(trial.config)
        assert run["tags"]["study.pack_size"] == "2" and run["tags"]["device.used"] == "cpu"
        assert run["tags"]["cpu_cells.used"] == "compiled"  # gcc is there
        assert "switches.set" not in run["tags"]  # none set when they trained
        curve = results.read_record(results.trial_path(out, trial.trial_id)).curve
        assert run["metrics"]["val/accuracy"] == [
            (p["iteration"], p["val/accuracy"]) for p in curve
        ]
    assert first["parent"]["status"] == "FINISHED"
    assert first["parent"]["tags"]["study.n_trials"] == "4"

    assert main(["import", str(out), "--output", str(store)]) == 0
    assert "0 trials added or completed, 4 there already" in capsys.readouterr().out
    assert store_contents(uri(store), "tiny") == first


def test_the_switches_a_file_trained_under_become_its_runs_tag(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = trained
    path = results.trial_path(out, "t0000")
    values = json.loads(path.read_text())
    values["machine"]["switches"] = {"HDETACH_CUDA_GRAPHS": "0"}  # as machine_info records it
    path.write_text(json.dumps(values))
    assert main(["import", str(out), "--output", str(tmp_path / "store")]) == 0
    runs = store_contents(uri(tmp_path / "store"), "tiny")
    assert runs["t0000"]["tags"]["switches.set"] == "HDETACH_CUDA_GRAPHS=0"
    assert "switches.set" not in runs["t0001"]["tags"]


def test_no_import_while_a_driver_runs_the_study_there(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """Its trials would log again every step the import wrote (a TrialRun knows its last step
    from when it opened): refused in one line, as a second driver is."""
    _, out = trained
    store = tmp_path / "store"
    with driving(store / "ray" / "tiny", "tiny"):
        assert main(["import", str(out), "--output", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study import: error: study tiny is running now (driver pid ")
    assert err.count("\n") == 1 and not (store / "mlflow.db").exists()
    assert main(["import", str(out), "--output", str(store)]) == 0  # the driver has ended


def test_a_partial_study_is_completed_by_a_later_import(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    space, out = trained
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "t0001.json").write_bytes((out / "t0001.json").read_bytes())
    record = results.read_record(out / "t0002.json")
    record.status, record.curve = "running", record.curve[:1]
    results.write_record(partial, record)
    store = tmp_path / "store"
    assert main(["import", str(partial), "--output", str(store)]) == 0
    held = store_contents(uri(store), "tiny")
    assert held["t0002"]["status"] == "RUNNING" and held["parent"]["status"] == "KILLED"
    assert [s for s, _ in held["t0002"]["metrics"]["val/accuracy"]] == [10]
    main(["ls", "--output", str(store)])
    assert "tiny" in capsys.readouterr().out

    assert main(["import", str(out), "--output", str(store)]) == 0  # from another machine
    assert "3 trials added or completed, 1 there already" in capsys.readouterr().out
    whole = tmp_path / "whole"
    main(["import", str(out), "--output", str(whole)])
    assert store_contents(uri(store), "tiny") == store_contents(uri(whole), "tiny")


def test_refused_files_change_nothing_and_the_others_import(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    space, out = trained
    store = tmp_path / "store"
    assert main(["import", str(out / "t0000.json"), "--output", str(store)]) == 0
    before = store_contents(uri(store), "tiny")

    other = tmp_path / "other"  # the same study name, another space (lr changed)
    changed = load_spec(space, overrides=["fixed.lr=0.02"], name="tiny")
    run_space(changed, other, packs=["p0000"], echo=lambda line: None)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "t0001.json").write_text((out / "t0001.json").read_text()[:200])
    newer = json.loads((out / "t0002.json").read_text())
    newer["format_version"] = 99
    (damaged / "t0002.json").write_text(json.dumps(newer))
    capsys.readouterr()
    code = main(["import", str(other), str(damaged), "--output", str(store)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    refused = [line for line in lines if line.startswith("refused: ")]
    assert len(refused) == 4, lines
    assert any(f"{other / 't0000.json'}: from another space" in line for line in refused)
    assert any(f"{damaged / 't0001.json'}: damaged, not JSON" in line for line in refused)
    assert any("t0002.json: result format version 99 is unknown" in line for line in refused)
    assert store_contents(uri(store), "tiny") == before

    # A damaged file among good ones: the good ones still import.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("t0002.json", "t0003.json"):
        (mixed / name).write_bytes((out / name).read_bytes())
    (mixed / "t0001.json").write_text("{")
    assert main(["import", str(mixed), "--output", str(store)]) == 1
    assert sorted(store_contents(uri(store), "tiny")) == ["parent", "t0000", "t0002", "t0003"]


def test_files_of_two_studies_are_refused_together_and_name_renames(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """Which file sorted first decided the study, and the other study's files were refused."""
    space, out = trained
    (tmp_path / "b").mkdir()
    elsewhere = write_space(tmp_path / "b", "other", tiny_copying())
    other = tmp_path / "other-trials"
    run_space(load_spec(elsewhere), other, packs=["p0000"], echo=lambda line: None)
    store = tmp_path / "store"
    capsys.readouterr()
    assert main(["import", str(out), str(other), "--output", str(store)]) == 2
    assert capsys.readouterr().err == (
        f"study import: error: {out} {other}: result files of 2 studies (other: 1, tiny: 4 "
        "files); import each study's files on their own\n"
    )
    assert not store.exists()
    # And a folder holding the other study's files takes no trial of this one.
    with pytest.raises(ConfigError, match=r"^--out: .*t0000.json: belongs to study other"):
        run_space(load_spec(space), other, packs=["p0001"], echo=lambda line: None)
    assert main(["import", str(out), "--output", str(store)]) == 0
    assert main(["import", str(out), "--output", str(store), "--name", "tiny-copy"]) == 0
    copy = store_contents(uri(store), "tiny-copy")
    assert copy["t0000"]["tags"]["study.name"] == "tiny-copy"
    assert sorted(copy) == sorted(store_contents(uri(store), "tiny"))


def test_nothing_to_import_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), "--output", str(tmp_path / "s")]) == 2
    error = capsys.readouterr().err
    assert "no result files (t0000.json ...) to import" in error and error.count("\n") == 1
    assert main(["import", str(tmp_path / "nowhere"), "--output", str(tmp_path / "s")]) == 2
    assert "no such folder of result files" in capsys.readouterr().err
    assert not (tmp_path / "s" / "mlflow.db").exists()


@pytest.mark.slow
def test_trials_trained_anywhere_make_the_study_study_run_makes(tmp_path: Path) -> None:
    ran = study_cli("run", str(QUICK), "--smoke", "--output", str(tmp_path / "ray"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    trained = study_cli(
        "trial", "--space", str(QUICK), "--smoke", "--out", str(tmp_path / "trials")
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    done = study_cli("import", str(tmp_path / "trials"), "--output", str(tmp_path / "local"))
    assert done.returncode == 0, done.stdout + done.stderr

    by_ray = store_contents(uri(tmp_path / "ray"), "quick")
    by_import = store_contents(uri(tmp_path / "local"), "quick")
    assert sorted(by_ray) == sorted(by_import) == ["parent", "t0000", "t0001"]
    # The one difference: the import says so (the report then says how its trials continue).
    assert by_import["parent"]["tags"].pop(IMPORTED_TAG) == "true"
    assert IMPORTED_TAG not in by_ray["parent"]["tags"]
    for key in by_ray:
        assert by_import[key] == by_ray[key], key  # params, tags, histories, status
    spec_texts = [
        Path(
            MlflowClient(uri(tmp_path / folder)).download_artifacts(
                tracking.open_store(uri(tmp_path / folder)).find_parent("quick").run_id,
                "spec.yaml",
                str(tmp_path / f"{folder}-artifacts"),
            )
        ).read_text()
        for folder in ("ray", "local")
    ]
    assert spec_texts[0] == spec_texts[1]

    verdicts = []
    for folder in ("ray", "local"):
        reported = study_cli("report", "quick", "--output", str(tmp_path / folder))
        assert reported.returncode == 0, reported.stdout + reported.stderr
        summary = json.loads((tmp_path / folder / "reports/quick/summary.json").read_text())
        verdicts.append((summary["verdicts"], summary["status"], summary["counts"]))
    assert verdicts[0] == verdicts[1]


@pytest.mark.slow
def test_the_shipped_results_import_into_their_study(tmp_path: Path) -> None:
    shipped = REPO / "results" / "quick"
    done = study_cli("import", str(shipped), "--output", str(tmp_path / "store"))
    assert done.returncode == 0, done.stdout + done.stderr
    record = results.read_record(results.result_files(shipped)[0])
    spec = result_import.study_spec(record.study, record.study.name, shipped)
    summary = tracking.open_store(uri(tmp_path / "store")).summarize("quick")
    assert summary is not None
    assert len(summary.trials) == summary.n_trials == make_plan(spec).n_trials
    assert summary.count("completed") == summary.n_trials
    assert record.budget()["fraction"] == 1.0 and not record.study.smoke
    reported = study_cli("report", "quick", "--output", str(tmp_path / "store"))
    assert reported.returncode == 0, reported.stdout + reported.stderr


def trained_for(space: Path, gpu: str | None, out: Path, *more: str) -> Path:
    """`study trial --space SPACE [--gpu GPU] --out OUT`, as a user trains a space's packs."""
    sized = ["--gpu", gpu] if gpu else []
    assert main(["trial", "--space", str(space), *sized, "--out", str(out), *more]) == 0
    return out


@pytest.fixture
def auto_space(tmp_path: Path) -> Path:
    """tiny_copying with `resources.pack: auto` on `device: auto`: for an H200 (or an A100),
    its 4 trials of one program each make one pack; without a GPU, 4 packs of 1."""
    body = tiny_copying(fixed={"device": "auto"}, resources={"pack": "auto"})
    return write_space(tmp_path, "auto_tiny", body)


def test_the_gpu_the_files_were_planned_for_is_the_studys(
    auto_space: Path, tmp_path: Path, capsys
) -> None:
    h200 = trained_for(auto_space, "h200", tmp_path / "h200")
    store = tmp_path / "store"
    assert main(["import", str(h200), "--output", str(store)]) == 0
    contents = store_contents(uri(store), "auto_tiny")
    tags = contents["parent"]["tags"]
    assert pack_gpu_from_tags(tags) == KNOWN_GPUS["h200"] and tags["study.pack_auto"] == "132"
    # `study resume` and later imports plan from these tags: the packs the files were trained in.
    plan = make_plan(load_spec(auto_space), pack_gpu_from_tags(tags))
    assert [[t.trial_id for t in pack.trials] for pack in plan.packs] == [
        ["t0000", "t0001", "t0002", "t0003"]
    ]
    for trial in plan.trials:
        trial_tags = contents[trial.trial_id]["tags"]
        assert (trial_tags["study.pack"], trial_tags["study.pack_size"]) == ("p0000", "4")

    # Files of the same space planned for an A100, imported with them: refused, one line each,
    # and the H200 files import as alone.
    a100 = trained_for(auto_space, "a100", tmp_path / "a100")
    capsys.readouterr()
    both = tmp_path / "both"
    assert main(["import", str(h200), str(a100), "--output", str(both)]) == 1
    refused = [line for line in capsys.readouterr().out.splitlines() if "refused" in line]
    assert refused == [
        f"refused: {a100 / f't000{n}.json'}: its packs (resources.pack: auto) were planned for "
        f"{KNOWN_GPUS['a100'].name}, the study's for {KNOWN_GPUS['h200'].name}: "
        "train them with one --gpu"
        for n in range(4)
    ]
    assert store_contents(uri(both), "auto_tiny") == contents


def test_files_planned_for_another_gpu_are_refused_by_an_existing_study(
    auto_space: Path, tmp_path: Path, capsys
) -> None:
    h200 = trained_for(auto_space, "h200", tmp_path / "h200", "--trials", "t0000")
    store = tmp_path / "store"
    assert main(["import", str(h200), "--output", str(store)]) == 0
    before = store_contents(uri(store), "auto_tiny")
    unsized = trained_for(auto_space, None, tmp_path / "unsized")  # 4 packs of 1
    capsys.readouterr()
    assert main(["import", str(unsized), "--output", str(store)]) == 1
    refused = [line for line in capsys.readouterr().out.splitlines() if "refused" in line]
    assert len(refused) == 4 and all("without a GPU" in line for line in refused), refused
    assert store_contents(uri(store), "auto_tiny") == before


def test_a_fixed_pack_size_imports_whatever_gpu_the_files_name(tmp_path: Path) -> None:
    space = write_space(tmp_path, "fixed_packs", tiny_copying(resources={"pack": 2}))
    sized = trained_for(space, "h200", tmp_path / "sized", "--pack", "p0000")
    # `study trial --space` on a GPU machine is sized for its own GPU (--gpu local) by default.
    unsized = trained_for(space, None, tmp_path / "unsized", "--pack", "p0001")
    assert main(["import", str(sized), str(unsized), "--output", str(tmp_path / "store")]) == 0


def test_the_space_rebuilds_from_its_resolved_text_with_its_hash(tmp_path: Path) -> None:
    spec = load_spec(QUICK, smoke=True, overrides=["fixed.lr=0.02"])
    study = StudyInfo(
        name=spec.name,
        space_hash=spec.spec_hash(),
        space_yaml=spec.to_yaml(),
        source=spec.source,
        smoke=spec.smoke,
        overrides=spec.overrides,
        base_iterations=spec.base_iterations,
    )
    rebuilt = result_import.study_spec(study, "renamed", tmp_path / "t0000.json")
    assert rebuilt.spec_hash() == spec.spec_hash() and rebuilt.name == "renamed"
    assert rebuilt.smoke and rebuilt.base_iterations == 3000
    assert rebuilt.overrides == (("fixed.lr", 0.02),)
    assert make_plan(rebuilt).trials == make_plan(spec).trials
    tampered = StudyInfo(**{**study.__dict__, "space_yaml": study.space_yaml.replace("40", "41")})
    with pytest.raises(ResultError, match="damaged: its space_yaml hashes to"):
        result_import.study_spec(tampered, "quick", tmp_path / "t0000.json")


def test_a_file_from_before_precision_auto_still_belongs_to_its_plan(tmp_path: Path) -> None:
    plan = make_plan(load_spec(QUICK, smoke=True))
    planned = plan.trials[0]
    assert planned.config.precision == "auto"
    path = tmp_path / f"{planned.trial_id}.json"
    older = record(trial_id=planned.trial_id, config=planned.config.replace(precision="fp32"))
    result_import._check_planned(older, plan, path)  # fp32 is what auto computed in on the CPU
    on_gpu = record(
        trial_id=planned.trial_id,
        config=planned.config.replace(precision="fp32"),
        device="cuda:0 (NVIDIA H200)",
    )
    with pytest.raises(ResultError, match="its config is not the plan's for t0000"):
        result_import._check_planned(on_gpu, plan, path)  # there auto is tf32: another trial
    sized = record(trial_id=planned.trial_id, config=planned.config, plan_gpu=KNOWN_GPUS["h100"])
    with pytest.raises(ResultError, match=r"planned for NVIDIA H100 .*study's without a"):
        result_import._check_planned(sized, plan, path)


def test_a_file_that_says_fp32_is_logged_with_the_plans_params_so_it_pairs(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    # Files written before `precision: auto` say fp32, which auto is on a CPU (the shipped
    # results/quick). Logged as they say, such trials never paired with newer ones in a report.
    space, out = trained
    older = tmp_path / "older"
    older.mkdir()
    record = results.read_record(out / "t0001.json")
    fp32 = dataclasses.replace(record, config=record.config.replace(precision="fp32"))
    results.write_record(older, fp32)
    store = tmp_path / "store"
    assert main(["import", str(older), str(out / "t0000.json"), "--output", str(store)]) == 0
    held = store_contents(uri(store), "tiny")
    assert held["t0001"]["params"]["precision"] == held["t0000"]["params"]["precision"] == "auto"
    assert held["t0001"]["tags"]["precision.used"] == "fp32"


def test_an_import_that_refuses_every_file_leaves_no_store(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    _, out = trained
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "t0000.json").write_text((out / "t0000.json").read_text()[:100])
    store = tmp_path / "new" / "store"
    assert main(["import", str(damaged), "--output", str(store)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "nothing imported"
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_the_report_of_a_partly_imported_study_says_how_the_rest_trains(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = trained
    store = tmp_path / "store"
    assert main(["import", str(out / "t0000.json"), "--output", str(store)]) == 0
    reported = study_cli("report", "tiny", "--output", str(store))
    assert reported.returncode == 0, reported.stdout + reported.stderr
    summary = (store / "reports" / "tiny" / "summary.md").read_text()
    assert "3 trial(s) pending" in summary
    # No Ray state: `study resume` cannot continue an imported study.
    assert "train them with the study's `study trial --space` commands" in summary
    assert "study resume" not in summary


def test_run_and_resume_of_a_partly_imported_study_say_how_the_rest_trains(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    space, out = trained
    store = tmp_path / "store"
    assert main(["import", str(out / "t0000.json"), "--output", str(store)]) == 0
    capsys.readouterr()
    assert main(["resume", "tiny", "--output", str(store)]) == 2
    resumed = capsys.readouterr().err
    assert "study tiny in" in resumed and "was made by `study import`" in resumed
    assert "`study plan SPACE --commands`), then `study import` their folder" in resumed
    assert main(["run", str(space), "--output", str(store)]) == 2
    ran = capsys.readouterr().err
    assert "made by `study import` (no Ray state for `study resume`)" in ran
    assert f"`study plan {space} --commands`" in ran and "continue it with" not in ran
