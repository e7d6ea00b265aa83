"""Reading a study back from a real MLflow SQLite store written as the runner writes it."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from analysis_fixtures import empty_store, make_trial, write_study
from mlflow import MlflowClient
from mlflow.entities import Metric

from study.analysis.load import load_study
from study.errors import ConfigError
from study.tracking import store_uri


def test_round_trip_of_every_trial_state(tmp_path):
    written = [
        make_trial("t0000", [0.3, 0.9, 1.0], lr=1.0e-4, seed=0),
        make_trial(
            "t0001",
            [0.3, 0.2],
            method="h_detach",
            p_detach=0.25,
            seed=1,
            clip_norm=None,
            state="diverged",
        ),  # fmt: skip
        make_trial("t0002", [0.4], seed=2, state="failed", error="ValueError: bad batch"),
        make_trial("t0003", [0.5, 0.6], seed=3, state="running"),
        make_trial("t0004", [0.7], seed=4, test_at_best=0.985),
    ]
    uri, parent_id = write_study(tmp_path, "quick", written, n_trials=7, target=0.95)
    study = load_study("quick", uri)

    assert (study.name, study.parent_run_id, study.n_planned, study.target) == (
        "quick", parent_id, 7, 0.95,
    )  # fmt: skip
    assert study.n_pending == 2 and study.split_params == []
    assert [t.trial_id for t in study.trials] == [t.trial_id for t in written]
    for got, want in zip(study.trials, written, strict=True):
        assert got.state == want.state
        assert got.cell == want.cell == ("copying T=100", *want.cell[1:])
        assert (got.seed, got.budget, got.error) == (want.seed, 1000, want.error)
        np.testing.assert_array_equal(got.val_steps, want.val_steps)
        np.testing.assert_allclose(got.val_acc, want.val_acc)
    assert study.trials[1].clip_norm is None and study.trials[1].lr == 1.0e-3
    assert study.trials[4].test_at_best == 0.985 and math.isnan(study.trials[0].test_at_best)


def test_a_varying_param_that_is_no_cell_axis_makes_cells_of_its_own(tmp_path):
    """Pooled with the seeds, two hidden sizes at seed 0 counted as two seeds of one cell."""
    trials = [
        make_trial("t0", [0.5], seed=0, extra_params={"hidden_size": "64"}),
        make_trial("t1", [0.5], seed=0, extra_params={"hidden_size": "128"}),
    ]
    uri, _ = write_study(tmp_path, "split", trials)
    study = load_study("split", uri)
    assert study.split_params == ["hidden_size"]
    assert [t.task for t in study.trials] == ["copying T=100 hidden_size=64",
                                              "copying T=100 hidden_size=128"]  # fmt: skip
    assert len({t.cell for t in study.trials}) == 2


def test_a_step_logged_twice_keeps_the_later_value(tmp_path):
    uri, _ = write_study(tmp_path, "retry", [make_trial("t0", [0.5, 0.6])])
    study = load_study("retry", uri)
    later = int(time.time() * 1000) + 10_000
    client = MlflowClient(tracking_uri=uri)
    client.log_batch(study.trials[0].run_id, metrics=[Metric("val/accuracy", 0.9, later, 200)])
    trial = load_study("retry", uri).trials[0]
    assert trial.val_steps.tolist() == [100, 200] and trial.val_acc.tolist() == [0.5, 0.9]


def test_unknown_study_names_study_and_uri(tmp_path):
    uri = empty_store(tmp_path)
    with pytest.raises(ConfigError, match=r"'nope'.*mlflow\.db.*no such experiment"):
        load_study("nope", uri)


def test_missing_database_is_an_error_and_creates_nothing(tmp_path):
    uri = store_uri(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"'quick'.*no MLflow database"):
        load_study("quick", uri)
    assert not (tmp_path / "empty").exists()


def test_experiment_without_parent_run_is_an_error(tmp_path):
    uri = empty_store(tmp_path)
    MlflowClient(tracking_uri=uri).create_experiment(
        "bare", artifact_location=(tmp_path / "mlartifacts").as_uri()
    )
    with pytest.raises(ConfigError, match="no parent run"):
        load_study("bare", uri)


def test_an_unreachable_server_is_named_once() -> None:
    with pytest.raises(ConfigError) as refused:
        load_study("quick", "http://127.0.0.1:1")
    assert str(refused.value).startswith(
        "study 'quick' at tracking URI http://127.0.0.1:1: cannot connect to 127.0.0.1:1"
    ), refused.value
