"""What one trial is, for train() and train_packed() alike: its state, step and evaluation, the
Progress it reports, the TrialResult it ends with, and the device it runs on."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from study.config import TrialConfig
from study.errors import ConfigError
from study.methods import annealed_iterations, make_method
from study.models import SequenceClassifier
from study.repro import derive_seed, make_generator
from study.tasks import Task, make_task

EVAL_BATCH_SIZE = 500


@dataclass
class Progress:
    """What a trial hands its `report` callback at each evaluation (and once at the end)."""

    iteration: int  # training iterations done so far
    metrics: dict[str, float]
    status: str  # study.vocabulary: running | completed | diverged
    _checkpoint: Callable[[], dict[str, Any]] = field(repr=False)

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue this trial exactly (torch.save-able). Built on demand."""
        return self._checkpoint()


@dataclass
class TrialResult:
    config: TrialConfig
    status: str
    curve: list[dict[str, float]]

    @property
    def final(self) -> dict[str, float]:
        return self.curve[-1] if self.curve else {}

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "status": self.status, "curve": self.curve}


Reporter = Callable[[Progress], None]


def resolve_device(name: str) -> torch.device:
    """`auto`: a GPU where torch sees one, else the CPU. A GPU asked for by name must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"device: {name} asked for, but torch sees {count} CUDA GPU(s) here; "
                "use device: auto (a GPU where there is one) or cpu"
            )
    return device


@torch.no_grad()
def evaluate(
    model: SequenceClassifier, task: Task, split: str, device: torch.device
) -> tuple[float, float]:
    """Mean loss and accuracy over a fixed split (the loss weighted by each batch's sequences,
    so a short last batch counts for what it holds)."""
    total_loss, correct, count, sequences = 0.0, 0, 0, 0
    for x, y in task.eval_batches(split, EVAL_BATCH_SIZE):
        logits = model(x.to(device), readout_steps=task.readout_steps)
        y = y.to(device)
        batch_correct, batch_count = task.metrics(logits, y)
        total_loss += float(task.loss(logits, y)) * x.shape[1]  # x is (T, batch, input)
        sequences += x.shape[1]
        correct += batch_correct
        count += batch_count
    return total_loss / max(sequences, 1), correct / max(count, 1)


class TrialState:
    """The mutable state of one trial: model, optimizer, generators, curve. train() steps it
    itself; train_packed() steps a pack of them as one model and uses each to evaluate and
    checkpoint its member. Kept together so that it checkpoints whole."""

    def __init__(
        self, config: TrialConfig, device: torch.device, task: Task | None = None
    ) -> None:
        self.config = config
        self.device = device
        # A packed run (study.packed_train) hands its members one shared task: one copy of data.
        self.task = (
            task if task is not None else make_task(config.task, config.task_options, config.seed)
        )
        self.model = SequenceClassifier(
            self.task.input_size, config.hidden_size, self.task.num_classes
        )
        # Separate generators: init, data order and detach draws never shift one another, so a
        # different p_detach sees exactly the same batches from the same initial weights.
        self.model.reset_parameters(make_generator(config.seed, "init"))
        self.model.to(device)
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.model.parameters(), lr=config.lr
            )
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr)
        annealed = annealed_iterations(
            config.anneal_last, config.anneal_fraction, config.iterations
        )
        self.method = make_method(config.method, config.p_detach, annealed)
        self.detach_generator = make_generator(config.seed, "detach")
        self.data_seed = derive_seed(config.seed, "data_order")
        self.iteration = 0
        self.curve: list[dict[str, float]] = []
        self.best_val_accuracy = -1.0
        self.test_at_best: float | None = None

    def checkpoint(self) -> dict[str, Any]:
        """This trial's whole state on the CPU, torch.save-able; `load` continues from it."""
        return {
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "detach_generator": self.detach_generator.get_state(),
            "curve": [dict(point) for point in self.curve],
            "best_val_accuracy": self.best_val_accuracy,
            "test_at_best": self.test_at_best,
        }

    def load(self, checkpoint: dict[str, Any]) -> None:
        # Compared as configs, not dicts: a checkpoint written before a field was added (with
        # its default, so the same curve) still resumes.
        if TrialConfig.from_dict(checkpoint["config"]) != self.config:
            raise ValueError("checkpoint belongs to a different trial config")
        # Optimizer.load_state_dict keeps the given tensors and training updates them in place:
        # copy, so the caller's checkpoint stays what it was (it may be resumed again).
        state = copy.deepcopy(checkpoint)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.detach_generator.set_state(state["detach_generator"])
        self.iteration = state["iteration"]
        self.curve = [dict(point) for point in state["curve"]]
        self.best_val_accuracy = state["best_val_accuracy"]
        self.test_at_best = state["test_at_best"]

    def step(self) -> tuple[float, float]:
        """One training iteration; returns (loss, gradient norm before clipping)."""
        config, task = self.config, self.task
        x, y = task.train_batch(self.iteration, config.batch_size, self.data_seed)
        masks = self.method.masks(
            task.seq_len, self.iteration, config.iterations, self.detach_generator
        )
        logits = self.model(
            x.to(self.device), masks.detach_h, masks.detach_c, readout_steps=task.readout_steps
        )
        loss = task.loss(logits, y.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        loss_value, norm_value = float(loss.detach()), float(grad_norm)
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            if config.clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(parameters, config.clip_norm, grad_norm)
            self.optimizer.step()
        self.iteration += 1
        return loss_value, norm_value

    def evaluate_point(self, train_loss: float, grad_norm: float) -> dict[str, float]:
        """The curve point at the current iteration, from the training window's means."""
        val_loss, val_accuracy = evaluate(self.model, self.task, "val", self.device)
        point = {
            "iteration": self.iteration,
            "train/loss": train_loss,
            "train/grad_norm": grad_norm,
            "val/loss": val_loss,
            "val/accuracy": val_accuracy,
        }
        if val_accuracy > self.best_val_accuracy:
            self.best_val_accuracy = val_accuracy
            if "test" in self.task.eval_splits:
                # Paper Sec. 5.2: test accuracy is read at the point of best validation accuracy.
                self.test_at_best = evaluate(self.model, self.task, "test", self.device)[1]
        point["best/val_accuracy"] = self.best_val_accuracy
        if self.test_at_best is not None:
            point["test/accuracy"] = self.test_at_best
        return point


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
