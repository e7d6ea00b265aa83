"""The LSTM cell's pointwise step on a CPU: lstm_cells.c compiled once and cached, or torch ops."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from study.models.notices import say_once
from study.switches import switch

SOURCE = Path(__file__).with_name("lstm_cells.c")
# "torch" forces the torch-op cells (slower; for machines without a C compiler they are the
# fallback anyway). Results of the two differ in the last bits of exp, so curves are identical
# for a seed only under the same choice.
ENV_SWITCH = "HDETACH_CPU_CELLS"
# -march=native: the kernel is built on the machine that runs it (the cache key names the CPU).
# -ffp-contract=off: no fused multiply-adds, so every element gets the same bits in a SIMD lane
# or in the scalar tail, which packing relies on.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c11", "-shared", "-fPIC"]


class TorchCells:
    """One LSTM step's pointwise work in torch ops: the fallback, and the reference the compiled
    kernel is tested against. Every tensor is a contiguous (B, 4H) or (B, H) block."""

    def forward(
        self,
        gates: torch.Tensor,
        c_prev: torch.Tensor,
        c_next: torch.Tensor,
        tanh_c: torch.Tensor,
        h_next: torch.Tensor,
    ) -> None:
        """Activate `gates` (pre-activations in, i|f|g|o out) and write c_t, tanh(c_t), h_t."""
        i, f, g, o = gates.chunk(4, 1)
        i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
        torch.addcmul(f * c_prev, i, g, out=c_next)
        torch.tanh(c_next, out=tanh_c)
        torch.mul(o, tanh_c, out=h_next)

    def backward(
        self,
        act: torch.Tensor,
        c_prev: torch.Tensor,
        tanh_c: torch.Tensor,
        dh: torch.Tensor | None,
        grad_out: torch.Tensor | None,
        dc: torch.Tensor | None,
        dgates: torch.Tensor,
        dc_out: torch.Tensor,
    ) -> None:
        """From the gradients reaching h_t (dh + grad_out) and c_t (dc; None = zero), write
        d loss / d gate pre-activations and d loss / d c_{t-1} (dc_out may be dc)."""
        i, f, g, o = act.chunk(4, 1)
        dh_t = torch.zeros_like(tanh_c)
        for term in (dh, grad_out):
            if term is not None:
                dh_t = dh_t + term
        dc_t = dh_t * (o * (1 - tanh_c * tanh_c))
        if dc is not None:
            dc_t = dc + dc_t
        d_i, d_f, d_g, d_o = dgates.chunk(4, 1)
        torch.mul(dc_t * g, i * (1 - i), out=d_i)
        torch.mul(dc_t * c_prev, f * (1 - f), out=d_f)
        torch.mul(dc_t * i, 1 - g * g, out=d_g)
        torch.mul(dh_t * tanh_c, o * (1 - o), out=d_o)
        torch.mul(dc_t, f, out=dc_out)


class CompiledCells(TorchCells):
    """TorchCells' step as one call into lstm_cells.c (float32 and float64 tensors)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointers = [ctypes.c_void_p] * 5
        sizes = [ctypes.c_int64] * 2
        self._forward, self._backward = {}, {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
            forward = getattr(library, f"lstm_forward_{suffix}")
            forward.argtypes, forward.restype = pointers + sizes, None
            backward = getattr(library, f"lstm_backward_{suffix}")
            backward.argtypes, backward.restype = [ctypes.c_void_p] * 8 + sizes, None
            self._forward[dtype], self._backward[dtype] = forward, backward
        self._zeros: dict[torch.dtype, torch.Tensor] = {}

    def forward(
        self,
        gates: torch.Tensor,
        c_prev: torch.Tensor,
        c_next: torch.Tensor,
        tanh_c: torch.Tensor,
        h_next: torch.Tensor,
    ) -> None:
        batch, hidden = c_prev.shape
        self._forward[gates.dtype](
            gates.data_ptr(),
            c_prev.data_ptr(),
            c_next.data_ptr(),
            tanh_c.data_ptr(),
            h_next.data_ptr(),
            batch,
            hidden,
        )

    def backward(
        self,
        act: torch.Tensor,
        c_prev: torch.Tensor,
        tanh_c: torch.Tensor,
        dh: torch.Tensor | None,
        grad_out: torch.Tensor | None,
        dc: torch.Tensor | None,
        dgates: torch.Tensor,
        dc_out: torch.Tensor,
    ) -> None:
        batch, hidden = c_prev.shape
        zero = self._zero_block(batch * hidden, act.dtype)
        self._backward[act.dtype](
            act.data_ptr(),
            c_prev.data_ptr(),
            tanh_c.data_ptr(),
            zero if dh is None else dh.data_ptr(),
            zero if grad_out is None else grad_out.data_ptr(),
            zero if dc is None else dc.data_ptr(),
            dgates.data_ptr(),
            dc_out.data_ptr(),
            batch,
            hidden,
        )

    def _zero_block(self, size: int, dtype: torch.dtype) -> int:
        """Address of at least `size` zeros, never written: stands in for an absent gradient."""
        zeros = self._zeros.get(dtype)
        if zeros is None or zeros.numel() < size:
            zeros = self._zeros[dtype] = torch.zeros(size, dtype=dtype)
        return zeros.data_ptr()


def cells_for(tensor: torch.Tensor) -> TorchCells:
    """The compiled cells for float32/float64 CPU tensors when they build here, else torch ops."""
    if tensor.dtype in (torch.float32, torch.float64) and not tensor.is_cuda:
        compiled = _compiled_cells()
        if compiled is not None:
            return compiled
    return _torch_cells()


def implementation(device: torch.device) -> str | None:
    """Which cells a trial on `device` runs in this process: "compiled" (lstm_cells.c) or
    "torch" on a CPU (which computes in fp32, cells_for's compiled dtype), None on CUDA. A
    curve's last bits depend on it, so result files record it and a resume refuses a state
    computed with the other (study.pack_state)."""
    if device.type != "cpu":
        return None
    return "torch" if _compiled_cells() is None else "compiled"


@functools.cache
def _torch_cells() -> TorchCells:
    return TorchCells()


@functools.cache
def _compiled_cells() -> CompiledCells | None:
    if switch(ENV_SWITCH) == "torch":
        say_once(f"{ENV_SWITCH}=torch: LSTM cells run as torch ops")
        return None
    try:
        return CompiledCells(ctypes.CDLL(str(build_library())))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        say_once(
            f"could not build {SOURCE.name} ({detail.strip().splitlines()[-1]}); LSTM cells "
            "run as torch ops, measured 1.7-1.9x slower per step (install a C compiler: gcc)",
            warn=True,
        )
        return None


def build_library() -> Path:
    """Compile lstm_cells.c into the user's cache (once per source, flags, compiler and CPU)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler found (set CC or install gcc)")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), version.encode(), _cpu_id()):
        key.update(part)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "hdetach-study" / "kernels"
    library = folder / f"lstm_cells-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent trials never load a half-written file.
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / library.name
        subprocess.run(
            [compiler, *CFLAGS, str(SOURCE), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(built, library)
    return library


def _cpu_id() -> bytes:
    """What -march=native depends on: the machine type and the CPU's model and feature flags."""
    lines = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags")):
                    lines.append(line)
                if len(lines) == 3:
                    break
    except OSError:
        pass
    return "".join(lines).encode()
