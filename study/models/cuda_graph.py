"""GraphedStep: a whole training step captured once in a CUDA graph, then replayed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from study.models.notices import say_once
from study.switches import switch

# Set to 0 to run every step eagerly (to compare speed, or to debug the step itself).
ENV_SWITCH = "HDETACH_CUDA_GRAPHS"
WARMUP_STEPS = 3


def graphs_enabled(device: torch.device) -> bool:
    """Whether a step on `device` can be captured; says once why not."""
    if device.type != "cuda":
        say_once("CUDA graphs need a CUDA device: the training step runs eagerly")
        return False
    if switch(ENV_SWITCH) == "0":
        say_once(f"{ENV_SWITCH}=0: the training step runs eagerly")
        return False
    return True


class GraphedStep:
    """Calls `step()` as one CUDA-graph replay. `step` must read and write static tensors only.

    Capture follows PyTorch's whole-network recipe (CUDA semantics notes, "CUDA Graphs"): a few
    warm-up steps on a side stream, so cuBLAS handles, autograd's stream bookkeeping and every
    cached allocation exist before capture; then one step captured on that same stream. The
    warm-up steps are real updates, so `state` (every tensor the step mutates: parameters,
    optimizer moments, counters) is copied first and restored in place afterwards: the first
    replay is the trial's first step. Where capture is impossible (no CUDA device,
    HDETACH_CUDA_GRAPHS=0, or capture raised) every call runs `step()` eagerly, said once.
    """

    def __init__(
        self, step: Callable[[], None], state: Sequence[torch.Tensor], device: torch.device
    ) -> None:
        self.step = step
        self.state = list(state)
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = not graphs_enabled(device)

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.eager:
            self.step()
        else:
            self._first_call()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _first_call(self) -> None:
        with torch.no_grad():
            saved = [tensor.detach().clone() for tensor in self.state]
        try:
            graph = self._warm_up_and_capture()
        except Exception as error:  # whatever broke the capture, the eager step still works
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._restore(saved)
            self.eager = True
            say_once(f"CUDA graph capture failed, training steps run eagerly: {error}", warn=True)
            self.step()
            return
        self._restore(saved)
        self.graph = graph
        if self.device.type == "cuda":
            # The warm-up's cached blocks are not reused by the graph's private pool.
            torch.cuda.empty_cache()
        graph.replay()

    def _warm_up_and_capture(self) -> torch.cuda.CUDAGraph:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self.step()
        return graph

    def _restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for tensor, value in zip(self.state, saved, strict=True):
                tensor.copy_(value)
