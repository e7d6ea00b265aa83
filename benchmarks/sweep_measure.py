"""The measuring child of benchmarks/pack_sweep.py: a process that times one point per request.

pack_sweep starts it (`python benchmarks/sweep_measure.py --device cuda`, through
sweep_children.Child) and writes one JSON request per line to its standard input. It answers each
with one line, MESSAGE followed by a JSON object; anything else it prints passes through to the
sweep's log. Its first answer says which device it measures. A request that fails is answered
with {"error": ...} and the child goes on; one whose failure poisons the CUDA context (an illegal
access) is answered, then the child exits, and the parent starts a fresh one for the next point.
A hang is the parent's to cut off (sweep_children.Child.receive).

What each kind of request measures (torch only: no Ray, MLflow or data sets; random inputs
shaped as the paper's tasks, as in lstm_step_cuda.py):
- pack: one pack's whole study step (lstm_step_cuda.pack_step: host batch, copy, forward, loss,
  backward, clip, Adam; graph-replayed on a GPU) and its start-up;
- warm: one untimed step, so that Triton compiles the pack's kernels into its disk cache;
- cudnn: a cuDNN nn.LSTM training step, the baseline of every ratio;
- eval: one member's evaluation of one batch (trial.evaluate);
- check: train_packed end to end for a pack of real TrialConfigs (the estimate check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from lstm_step_cuda import (
    P_DETACH,
    SHAPES,
    RandomTask,
    forget_kernels,
    kernels_used,
    pack_step,
    path_note,
    release,
    time_steps,
)
from torch import nn

from study.config import TrialConfig
from study.models import SequenceClassifier
from study.packed_train import cuda_precision, train_packed
from study.tasks import TASKS
from study.trial import EVAL_BATCH_SIZE, evaluate

# name -> (label, T, B, H, classes, readout): the two paper shapes of lstm_step_cuda (copying
# T=100: 120 LSTM steps, H=128; pixel MNIST: 784, H=100; batch 100), and a tiny one that a CPU
# runs in seconds (the sweep's own test).
SWEEP_SHAPES = {
    "copying": SHAPES[0],
    "pixel_mnist": SHAPES[1],
    "tiny": ("tiny (CPU check)", 5, 8, 16, 10, "last"),
}
MESSAGE = "@@"  # an answer line starts with this, followed by one JSON object
RANDOM_TASK = "random"  # lstm_step_cuda.RandomTask, registered while the check runs


def _shape(request: dict[str, Any]) -> tuple[int, int, int, int, str]:
    _, seq_len, batch, hidden, classes, readout = SWEEP_SHAPES[request["shape"]]
    return seq_len, batch, hidden, classes, readout


def measure_pack(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One pack's study step (timed as lstm_step_cuda.study_step times it), the kernels it ran,
    and its start-up: building the members and the first call (kernels loaded, on a GPU the
    CUDA graph's warm-up steps and capture) less the one step that call makes."""
    forget_kernels()
    with cuda_precision(request["precision"], device):
        _synchronize(device)
        started = time.perf_counter()
        step = pack_step(_shape(request), request["members"], device, request["precision"])
        step()
        _synchronize(device)
        first_ms = (time.perf_counter() - started) * 1000
        ms = time_steps(step, request["steps"], request["rounds"])
    release()
    start_ms = first_ms - ms if first_ms > ms else None  # not measurable under the noise
    note = path_note("Triton").strip(" []")
    return {"ms": ms, "start_ms": start_ms, "kernel": kernels_used(), "note": note}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_pack(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One step of a pack, untimed: its first call compiles the kernels (Triton's disk cache)."""
    forget_kernels()
    with cuda_precision(request["precision"], device):
        pack_step(_shape(request), request["members"], device, request["precision"])()
    _synchronize(device)
    release()
    return {"kernel": kernels_used()}


def measure_cudnn(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """cuDNN nn.LSTM's whole training step (forward, loss, backward, clip, Adam) with torch's
    defaults (cuDNN in TF32, matmuls in fp32): lstm_step_cuda's "STEP nn.LSTM + clip + Adam,
    eager" row, its inputs already on the device."""
    seq_len, batch, hidden, classes, readout = _shape(request)
    x = torch.rand(seq_len, batch, 1, device=device)
    y_shape = (seq_len, batch) if readout == "all" else (batch,)
    y = torch.randint(0, classes, y_shape, device=device)
    lstm, head = nn.LSTM(1, hidden).to(device), nn.Linear(hidden, classes).to(device)
    parameters = [*lstm.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        output, (h_n, _) = lstm(x)
        logits = head(h_n[-1] if readout == "last" else output)
        flat = logits.reshape(-1, classes)
        nn.functional.cross_entropy(flat, y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    try:
        ms = time_steps(train_step, request["steps"], request["rounds"])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    release()
    return {"ms": ms}


def measure_eval(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One member's evaluation of one batch, as train_packed runs it per member (trial.evaluate:
    no_grad, torch's fused LSTM; the batch made on the host and copied in; the loss read back)."""
    seq_len, _, hidden, classes, readout = _shape(request)
    task = RandomTask(seq_len, classes, readout)
    model = SequenceClassifier(1, hidden, classes).to(device)
    with cuda_precision(request["precision"], device):
        ms = time_steps(
            lambda: evaluate(model, task, "val", device), request["steps"], request["rounds"]
        )
    release()
    return {"ms": ms, "batch": EVAL_BATCH_SIZE}


def check_run(request: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Wall seconds of train_packed for a pack of real TrialConfigs on the random task, for
    `iterations` and for twice as many, evaluating every `iterations` (so once, and twice):
    end to end, from building the members to the last evaluation's read-back."""
    seq_len, batch, hidden, classes, readout = _shape(request)
    options = {"seq_len": seq_len, "num_classes": classes, "readout": readout}
    iterations = request["iterations"]
    TASKS[RANDOM_TASK] = RandomTask  # for TrialConfig (check_registered) and train_packed
    seconds, statuses = [], []
    try:
        for total in (iterations, 2 * iterations):
            configs = [
                TrialConfig(
                    task=RANDOM_TASK,
                    task_options=options,
                    method="h_detach",
                    p_detach=P_DETACH,
                    lr=(1e-3, 5e-4)[k % 2],
                    hidden_size=hidden,
                    batch_size=batch,
                    seed=k,
                    iterations=total,
                    eval_every=iterations,
                    device=str(device),
                    precision=request["precision"],
                )
                for k in range(request["members"])
            ]
            forget_kernels()
            _synchronize(device)
            started = time.perf_counter()
            results = train_packed(configs)
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
            statuses.append(sorted({result.status for result in results}))
            release()
    finally:
        TASKS.pop(RANDOM_TASK, None)
    return {"seconds": seconds, "statuses": statuses, "kernel": kernels_used()}


HANDLERS: dict[str, Callable[[dict[str, Any], torch.device], dict[str, Any]]] = {
    "pack": measure_pack,
    "warm": warm_pack,
    "cudnn": measure_cudnn,
    "eval": measure_eval,
    "check": check_run,
}


def _answer(message: dict[str, Any]) -> None:
    print(MESSAGE + json.dumps(message), flush=True)


def _healthy(device: torch.device) -> bool:
    """Whether the CUDA context still works after a failure (an illegal access poisons it)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:  # whatever broke, this process cannot measure any more
        return False


def serve(device_name: str) -> None:
    """The child: say what device this is, then answer one JSON request per input line."""
    if device_name == "cuda" and not torch.cuda.is_available():
        _answer({"error": "no CUDA device here"})
        return
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    _answer(
        {
            "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
            "sms": torch.cuda.get_device_properties(device).multi_processor_count if cuda else 0,
            "torch": torch.__version__,
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        try:
            answer = HANDLERS[request["kind"]](request, device)
        except Exception as error:  # a failed point is reported; the sweep goes on
            release()
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            answer = {"error": f"{type(error).__name__}: {reason}"[:300]}
            if not _healthy(device):
                answer["error"] += " (the CUDA context is lost: a fresh child takes over)"
                answer["wall_s"] = time.perf_counter() - started
                _answer(answer)
                sys.exit(3)
        answer["wall_s"] = time.perf_counter() - started
        _answer(answer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    serve(parser.parse_args(argv).device)


if __name__ == "__main__":
    main()
