"""train_packed(configs, reports): K trials of one task trained as one batched model."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from study.config import TrialConfig, resolve_precision
from study.errors import ConfigError
from study.models.cuda_graph import GraphedStep
from study.models.packed import PackedClassifier
from study.tasks import Task, make_task
from study.trial import Progress, Reporter, TrialResult, TrialState, resolve_device
from study.vocabulary import COMPLETED, DIVERGED, RUNNING

# What the members of a pack share: one model shape, one batch layout, one schedule. Everything
# else (seed, lr, method, p_detach, anneal_last, anneal_fraction, clip_norm, task options that
# keep the shapes, e.g. permutation_seed) may differ.
SHARED_FIELDS = (
    "task",
    "hidden_size",
    "batch_size",
    "optimizer",
    "iterations",
    "eval_every",
    "device",
    "precision",
)
# On a GPU the per-member loss flags are read back every this many steps (one host sync), not
# every step: a diverged member costs at most this many wasted steps and still ends `diverged`
# at the iteration where it happened. On a CPU they are read every step (reading is free).
DIVERGENCE_CHECK_EVERY = 100
# torch.optim.Adam's defaults, which the solo run uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _device_steps(device: torch.device) -> bool:
    """Whether a pack on `device` runs the sync-free device step (graph-captured on CUDA).

    On a CPU the exact host step runs instead; tests switch the device step on there to check
    its arithmetic and the deferred divergence reads without a GPU.
    """
    return device.type == "cuda"


def pack_key(config: TrialConfig) -> tuple[Any, ...]:
    """Trials with equal keys can share a pack (the task must also give equal shapes)."""
    return tuple(getattr(config, name) for name in SHARED_FIELDS)


def check_packable(configs: Sequence[TrialConfig]) -> None:
    """Raise ConfigError naming the first field on which the configs cannot share a pack."""
    if not configs:
        raise ConfigError("pack: needs at least one trial config")
    first = configs[0]
    for config in configs[1:]:
        for name in SHARED_FIELDS:
            if getattr(config, name) != getattr(first, name):
                raise ConfigError(
                    f"pack: {name} must be equal across a pack, got {getattr(first, name)!r} "
                    f"and {getattr(config, name)!r}"
                )


@dataclass
class _Window:
    """Per-member sums since the last evaluation, read back from the pack in one transfer."""

    loss_sum: list[float]
    norm_sum: list[float]
    count: list[int]  # finite steps since the last evaluation
    alive: list[bool]
    bad_loss: list[float]  # the loss and norm of the step that diverged
    bad_norm: list[float]


class _Pack:
    """The batched model, optimizer and per-member bookkeeping of one packed run."""

    def __init__(self, members: list[TrialState], device: torch.device) -> None:
        self.members = members
        self.device = device
        first = members[0]
        # The members' tasks are of one class with equal shapes (_shared_tasks): the first's
        # read-out and batched loss serve the whole pack on the device step.
        self.task = first.task
        self.adam = first.config.optimizer == "adam"
        self.model = PackedClassifier.from_members([member.model for member in members])
        flat = self.model.flat
        count = len(members)
        self.exp_avg = torch.zeros_like(flat, requires_grad=False)
        self.exp_avg_sq = torch.zeros_like(flat, requires_grad=False)
        self.lrs = [member.config.lr for member in members]
        self.lr = torch.tensor(self.lrs, dtype=torch.float64, device=device)
        # clip_norm None (no clipping) = infinite threshold: the clip factor clamps to exactly 1.
        clips = [member.config.clip_norm for member in members]
        self.clip = torch.tensor(
            [math.inf if c is None else c for c in clips], dtype=torch.float32, device=device
        )
        self.steps = torch.zeros((), dtype=torch.float32, device=device)  # Adam's step count
        self.alive = torch.ones(count, dtype=torch.bool, device=device)
        self.loss_sum = torch.zeros(count, dtype=torch.float64, device=device)
        self.norm_sum = torch.zeros(count, dtype=torch.float64, device=device)
        self.count = torch.zeros(count, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros(count, dtype=torch.float64, device=device)
        self.bad_norm = torch.zeros(count, dtype=torch.float64, device=device)
        self._load_optimizer_states()
        self.static: dict[str, torch.Tensor | None] = {}
        self.graphed: GraphedStep | None = None
        if _device_steps(device):
            self.model.device_path = True
            state = [flat, self.exp_avg, self.exp_avg_sq, self.steps, self.alive]
            state += [self.loss_sum, self.norm_sum, self.count, self.bad_loss, self.bad_norm]
            self.graphed = GraphedStep(self._device_step, state, device)

    # --- one training iteration -------------------------------------------------------------

    def step(self, iteration: int) -> None:
        xs, ys, detach_h, detach_c = self._host_batch(iteration)
        if self.graphed is None:
            self._cpu_step(torch.stack(xs), ys, detach_h, detach_c)
            return
        values = {"x": torch.stack(xs), "y": torch.stack(ys), "h": detach_h, "c": detach_c}
        if not self.static:
            self.static = {
                name: None if value is None else torch.empty_like(value, device=self.device)
                for name, value in values.items()
            }
        for name, value in values.items():
            target = self.static[name]
            if target is not None and value is not None:
                if self.device.type == "cuda":
                    # Pinned staging lets the copy run behind the previous replay; the caching
                    # host allocator keeps each staging block until its copy has finished.
                    value = value.pin_memory()
                target.copy_(value, non_blocking=True)
        self.graphed()

    def _host_batch(
        self, iteration: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """Each member's batch and detach draws, from its own generators, as its solo run."""
        xs, ys, hs, cs = [], [], [], []
        for member in self.members:
            config, task = member.config, member.task
            x, y = task.train_batch(iteration, config.batch_size, member.data_seed)
            masks = member.method.masks(
                task.seq_len, iteration, config.iterations, member.detach_generator
            )
            xs.append(x)
            ys.append(y)
            hs.append(masks.detach_h)
            cs.append(masks.detach_c)
        return xs, ys, _stack_masks(hs), _stack_masks(cs)

    def _cpu_step(
        self,
        x: torch.Tensor,
        ys: list[torch.Tensor],
        detach_h: torch.Tensor | None,
        detach_c: torch.Tensor | None,
    ) -> None:
        """Bit-identical to each member's solo `TrialState.step`: the same loss, norm and clip
        ops (the loss per member, as the solo run computes it, not the batched device loss)."""
        logits = self.model(x, detach_h, detach_c, readout_steps=self.task.readout_steps)
        losses = [member.task.loss(logits[k], ys[k]) for k, member in enumerate(self.members)]
        loss = torch.stack(losses)
        (grad,) = torch.autograd.grad(loss.sum(), self.model.flat)
        norms = torch.stack(
            [
                torch.nn.utils.get_total_norm(self.model.member_views(grad, k))
                for k in range(len(self.members))
            ]
        )
        self._finish(loss.detach(), norms, grad)

    def _device_step(self) -> None:
        """The whole step on the device, no host sync: what the CUDA graph captures."""
        static = self.static
        readout_steps = self.task.readout_steps
        logits = self.model(static["x"], static["h"], static["c"], readout_steps=readout_steps)
        loss = self.task.loss(logits, static["y"])  # (K,): one loss per member
        (grad,) = torch.autograd.grad(loss.sum(), self.model.flat)
        norms = torch.linalg.vector_norm(grad, dim=1)
        self._finish(loss.detach(), norms, grad)

    @torch.no_grad()
    def _finish(self, loss: torch.Tensor, norms: torch.Tensor, grad: torch.Tensor) -> None:
        """Clip per member, update the members still alive, keep the window sums."""
        finite = torch.isfinite(loss) & torch.isfinite(norms)
        ok = finite & self.alive
        first_bad = self.alive & ~finite
        self.bad_loss.copy_(torch.where(first_bad, loss.double(), self.bad_loss))
        self.bad_norm.copy_(torch.where(first_bad, norms.double(), self.bad_norm))
        self.alive.logical_and_(finite)
        self.loss_sum.add_(torch.where(ok, loss.double(), 0.0))
        self.norm_sum.add_(torch.where(ok, norms.double(), 0.0))
        self.count.add_(ok)
        # clip_grads_with_norm_'s arithmetic (a float over a tensor is reciprocal-times there),
        # per member; a member that stopped gets a zero factor and, below, a zero step: frozen.
        factor = torch.clamp((norms + 1e-6).reciprocal() * self.clip, max=1.0)
        factor = torch.where(ok, factor, 0.0)
        grad.mul_(factor.unsqueeze(1)).nan_to_num_(0.0, 0.0, 0.0)
        if self.adam:
            self._adam(grad, ok, host_scalars=self.graphed is None)
        else:
            scale = torch.where(ok, -self.lr, 0.0).float()
            self.model.flat.addcmul_(grad, scale.unsqueeze(1))  # = add_(grad, alpha=-lr)

    def _adam(self, grad: torch.Tensor, ok: torch.Tensor, host_scalars: bool) -> None:
        """torch.optim.Adam's update (single-tensor path) with a learning rate per member."""
        beta1, beta2 = ADAM_BETAS
        self.steps.add_(1)
        if not host_scalars:
            steps = self.steps.double()
            step_size = self.lr / (1 - beta1**steps)
            bias_correction2_sqrt: float | torch.Tensor = (1 - beta2**steps).sqrt().float()
            scale = torch.where(ok, -step_size, 0.0).float()
        else:
            # The solo optimizer's Python-float arithmetic, so each member's bits match it.
            steps = self.steps.item()
            bias_correction1 = 1 - beta1**steps
            bias_correction2_sqrt = (1 - beta2**steps) ** 0.5
            alive = ok.tolist()
            scale = torch.tensor(
                [
                    -(lr / bias_correction1) if keep else 0.0
                    for lr, keep in zip(self.lrs, alive, strict=True)
                ],
                dtype=grad.dtype,
            )
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        # addcdiv_(exp_avg, denom, value=-step_size) computes (value * exp_avg) / denom.
        self.model.flat.add_(self.exp_avg.mul(scale.unsqueeze(1)).div_(denom))

    # --- reading back and member state -------------------------------------------------------

    def read_window(self) -> _Window:
        values = torch.stack(
            [
                self.loss_sum,
                self.norm_sum,
                self.count.double(),
                self.alive.double(),
                self.bad_loss,
                self.bad_norm,
            ]
        ).tolist()
        loss_sum, norm_sum, count, alive, bad_loss, bad_norm = values
        return _Window(
            loss_sum,
            norm_sum,
            [int(c) for c in count],
            [a > 0 for a in alive],
            bad_loss,
            bad_norm,
        )

    def reset_window(self) -> None:
        for tensor in (self.loss_sum, self.norm_sum, self.count):
            tensor.zero_()

    def store_member(self, k: int) -> None:
        """Write member k's weights (and Adam moments) into its solo model and optimizer."""
        member = self.members[k]
        self.model.store_member(k, member.model)
        if not self.adam:
            return
        steps = torch.tensor(self.steps.item(), dtype=torch.float32)
        moments = zip(
            member.model.parameters(),
            self.model.member_views(self.exp_avg, k),
            self.model.member_views(self.exp_avg_sq, k),
            strict=True,
        )
        for parameter, exp_avg, exp_avg_sq in moments:
            member.optimizer.state[parameter] = {
                "step": steps.clone(),
                "exp_avg": exp_avg.clone(),
                "exp_avg_sq": exp_avg_sq.clone(),
            }

    def checkpoint(self, k: int) -> dict[str, Any]:
        self.store_member(k)
        return self.members[k].checkpoint()

    def _load_optimizer_states(self) -> None:
        """Resumed members bring their Adam moments; all must be at the same step."""
        if not self.adam:
            return
        steps = set()
        for k, member in enumerate(self.members):
            states = [member.optimizer.state.get(p) for p in member.model.parameters()]
            if not all(states):
                steps.add(0.0)
                continue
            steps.add(float(states[0]["step"]))
            rows = zip(
                states,
                self.model.member_views(self.exp_avg, k),
                self.model.member_views(self.exp_avg_sq, k),
                strict=True,
            )
            for state, exp_avg, exp_avg_sq in rows:
                exp_avg.copy_(state["exp_avg"])
                exp_avg_sq.copy_(state["exp_avg_sq"])
        if len(steps) > 1:
            raise ConfigError(f"pack: members resume from different optimizer steps {steps}")
        self.steps.fill_(steps.pop())


def _stack_masks(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    """(K, T) detach masks; a member whose method never detaches on this path gets zeros."""
    present = [mask for mask in masks if mask is not None]
    if not present:
        return None
    never = torch.zeros_like(present[0])
    return torch.stack([never if mask is None else mask for mask in masks])


def _shared_tasks(configs: Sequence[TrialConfig]) -> list[Task]:
    """One task object per distinct (task, options): members share data, the shapes must agree."""
    built: dict[str, Task] = {}
    tasks = []
    for config in configs:
        options = dict(config.task_options)
        if options.get("permutation_seed") == "seed":
            options["permutation_seed"] = config.seed
        key = repr((config.task, sorted(options.items())))
        if key not in built:
            built[key] = make_task(config.task, config.task_options, config.seed)
        tasks.append(built[key])
    first = tasks[0]
    for task in tasks[1:]:
        shape = (task.seq_len, task.input_size, task.num_classes, task.readout_steps)
        if shape != (first.seq_len, first.input_size, first.num_classes, first.readout_steps):
            raise ConfigError("pack: task_options must give every member the same shapes")
    return tasks


@contextlib.contextmanager
def cuda_precision(precision: str, device: torch.device) -> Iterator[None]:
    """On CUDA, TF32 for matmuls, cuDNN and the Triton LSTM kernels exactly when `precision`
    resolves to "tf32" there (tf32, or auto: config.resolve_precision; torch's own defaults
    differ: cuDNN allows TF32, matmuls do not); restored after. Elsewhere nothing is touched,
    so on a CPU auto, fp32 and tf32 run the same ops."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    allow = resolve_precision(precision, device.type) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def train_packed(
    configs: Sequence[TrialConfig],
    reports: Sequence[Reporter | None] | None = None,
    resume_from: Sequence[dict[str, Any] | None] | None = None,
) -> list[TrialResult]:
    """Train K trials as one batched model; each member behaves as `train(config, report)`.

    Member k has its own generators (init, data order, detach draws), learning rate, clipping,
    curve, outcome and `reports[k]` callback, and its curve equals its solo run's (bit for bit on
    a CPU, to float tolerance on a GPU). A member that diverges is frozen and reported
    `diverged`; the others go on. Its final checkpoint holds its last finite weights; its Adam
    moments have decayed by the steps until the divergence was read back.
    """
    check_packable(configs)
    count = len(configs)
    reports = list(reports) if reports is not None else [None] * count
    resumes = list(resume_from) if resume_from is not None else [None] * count
    if len(reports) != count or len(resumes) != count:
        raise ConfigError("pack: configs, reports and resume_from must have the same length")
    first = configs[0]
    device = resolve_device(first.device)
    tasks = _shared_tasks(configs)
    members = [
        TrialState(config, device, task) for config, task in zip(configs, tasks, strict=True)
    ]
    for member, state in zip(members, resumes, strict=True):
        if state is not None:
            member.load(state)
    if len({member.iteration for member in members}) > 1:
        raise ConfigError("pack: resumed members must be at the same iteration")
    with cuda_precision(first.precision, device):
        return _run(members, reports, device)


def _run(
    members: list[TrialState], reports: list[Reporter | None], device: torch.device
) -> list[TrialResult]:
    """train_packed's loop: steps, divergence reads and evaluations of every member."""
    count, first = len(members), members[0].config
    pack = _Pack(members, device)

    def send(k: int, status: str, point: dict[str, float]) -> None:
        report = reports[k]
        if report is not None:
            metrics = {key: value for key, value in point.items() if key != "iteration"}
            # Built only when the reporter asks for it, as train() does.
            checkpoint = functools.partial(pack.checkpoint, k)
            report(Progress(members[k].iteration, metrics, status, checkpoint))

    total, eval_every = first.iterations, first.eval_every
    check_every = 1 if pack.graphed is None else DIVERGENCE_CHECK_EVERY
    iteration = window_start = members[0].iteration
    running = list(range(count))
    status = {k: COMPLETED for k in running}
    while running and iteration < total:
        boundary = min((iteration // eval_every + 1) * eval_every, total)
        stop = min(boundary, iteration + check_every)
        while iteration < stop:
            pack.step(iteration)
            iteration += 1
        window = pack.read_window()
        for k in [k for k in running if not window.alive[k]]:
            member = members[k]
            member.iteration = window_start + window.count[k] + 1
            point = {
                "iteration": member.iteration,
                "train/loss": window.bad_loss[k],
                "train/grad_norm": window.bad_norm[k],
            }
            member.curve.append(point)
            send(k, DIVERGED, point)
            status[k] = DIVERGED
            running.remove(k)
        if iteration == boundary and running:
            for k in running:
                member = members[k]
                member.iteration = iteration
                pack.store_member(k)
                point = member.evaluate_point(
                    window.loss_sum[k] / window.count[k], window.norm_sum[k] / window.count[k]
                )
                member.curve.append(point)
                send(k, COMPLETED if iteration == total else RUNNING, point)
            pack.reset_window()
            window_start = iteration
    return [TrialResult(m.config, status[k], m.curve) for k, m in enumerate(members)]
