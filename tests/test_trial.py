"""study.trial: evaluation over a whole split, device choice, checkpoints of one trial's state."""

from __future__ import annotations

import pytest
import torch

from study import trial as trial_module
from study.config import TrialConfig
from study.errors import ConfigError
from study.models.classifier import SequenceClassifier
from study.tasks.copying import Copying
from study.trial import TrialResult, TrialState, evaluate, resolve_device

SMALL = TrialConfig(
    task="copying",
    task_options={"T": 4, "train_size": 50, "val_size": 20},
    method="h_detach",
    p_detach=0.25,
    hidden_size=8,
    batch_size=5,
    iterations=4,
    eval_every=2,
)


def test_evaluation_loss_is_over_the_whole_split_whatever_the_batching(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """7 validation sequences in batches of 3, 3 and 1: each sequence counts once."""
    task = Copying(T=4, train_size=10, val_size=7)
    model = SequenceClassifier(task.input_size, 8, task.num_classes)
    whole_loss, whole_accuracy = evaluate(model, task, "val", torch.device("cpu"))
    monkeypatch.setattr(trial_module, "EVAL_BATCH_SIZE", 3)
    loss, accuracy = evaluate(model, task, "val", torch.device("cpu"))
    assert loss == pytest.approx(whole_loss, rel=1e-6) and accuracy == whole_accuracy


def test_a_gpu_asked_for_by_name_must_exist() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"^device: cuda:{count} asked for, but torch sees"):
        resolve_device(f"cuda:{count}")


def test_a_checkpoint_continues_the_same_config_only() -> None:
    first = TrialState(SMALL, torch.device("cpu"))
    first.step()
    checkpoint = first.checkpoint()
    second = TrialState(SMALL, torch.device("cpu"))
    second.load(checkpoint)
    assert second.iteration == 1 and second.step() == first.step()
    # A checkpoint from before a field existed (its default then) still belongs to the config.
    older = {**checkpoint, "config": dict(checkpoint["config"])}
    del older["config"]["anneal_fraction"]
    TrialState(SMALL, torch.device("cpu")).load(older)
    with pytest.raises(ValueError, match="different trial config"):
        TrialState(SMALL.replace(seed=1), torch.device("cpu")).load(checkpoint)


def test_result_final_point_and_json() -> None:
    result = TrialResult(SMALL, "completed", [{"val/accuracy": 0.1}, {"val/accuracy": 0.2}])
    assert result.final == {"val/accuracy": 0.2}
    assert TrialResult(SMALL, "diverged", []).final == {}
    assert result.to_json()["config"] == SMALL.to_dict()
