"""Compile each Triton LSTM kernel launch for an H100 on any machine; dump or compare the SASS.

For checking a kernel refactor where no GPU is at hand: dump before, change, dump after, then
`compare BEFORE AFTER` lists the kernels whose time loop runs other operations (register
numbers and addresses aside). Needs torch, triton (with its ptxas and cuobjdump) and pytest.

    python benchmarks/kernel_sass.py dump /tmp/before [--only split]
    python benchmarks/kernel_sass.py compare /tmp/before /tmp/after
    python benchmarks/kernel_sass.py stats /tmp/after --kernels 'split-100-16-tf32-hc*'

Split kernels are named split-H-UNITS-PRECISION-MASKS[-tagged][-partials]; the wide layouts
(more than 16 rows a program, study/pack_layout.py) add -rowsN, and their backward always takes
the partial sums. `stats` also prints each kernel's registers and spilled bytes per thread and
shared memory per program (what chose the wide layouts' warps: triton_split.WIDE_WARPS).

Another Triton (e.g. the GPU image's 3.6.0, which torch 2.11 ships) needs no other torch:
    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python benchmarks/kernel_sass.py dump /tmp/before36
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import pytest  # noqa: E402
import test_triton_lstm as kernels_test  # noqa: E402 (its launch recorder and compiler)
import triton.backends.nvidia  # noqa: E402

from study import pack_layout  # noqa: E402
from study.models import triton_lstm, triton_split  # noqa: E402

CUOBJDUMP = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
# (T, K, B, H, I, masks, grad_output, grad_h_n, grad_c_n) with all optional inputs, then none.
CASES = [(5, 1, 19, 0, 1, "hc", True, True, True), (5, 1, 19, 0, 3, "", True, False, False)]
DEFAULTS = ("barrier", "gates")  # the split kernels' exchange and backward handoff


def _record(module, monkeypatch: pytest.MonkeyPatch) -> dict:
    recorders = {}
    for name in ("_forward_kernel", "_backward_kernel"):
        recorders[name] = kernels_test._Recorded(getattr(module, name))
        monkeypatch.setattr(module, name, recorders[name])
    return recorders


def resources(cubin: Path, shared: int) -> dict[str, int]:
    """Registers and stack (spilled registers) per thread from cuobjdump -res-usage, and the
    shared memory per program that triton allots (`shared`: its metadata; not in the cubin)."""
    usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True)
    found = dict(re.findall(r"(REG|STACK):(\d+)", usage.stdout))
    return {"registers": int(found["REG"]), "spill_bytes": int(found["STACK"]), "shared": shared}


def _write(folder: Path, tag: str, recorders: dict) -> None:
    for name, recorder in recorders.items():
        ((args, kwargs),) = recorder.calls
        compiled = kernels_test._compile_for_hopper(recorder.kernel, args, kwargs)
        cubin = folder / f"{tag}-{name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True)
        (folder / f"{tag}-{name}.sass").write_text(sass.stdout)
        usage = resources(cubin, compiled.metadata.shared) | {"warps": kwargs["num_warps"]}
        (folder / f"{tag}-{name}.json").write_text(json.dumps(usage))
        cubin.unlink()


def _splits() -> list[tuple[int, int, str, str, int]]:
    """The split launches dumped, as (hidden, units, sync, handoff, rows): the 16-row ones as
    before the wide layouts, then every wide layout that compiles without spilling
    (pack_layout.WIDEST_ROWS) at both sizes. (Precision is the caller's loop.)"""
    splits = [(100, 16, "barrier"), (128, 16, "barrier"), (100, 32, "barrier")]
    splits += [(100, 16, "tagged"), (128, 16, "tagged")]
    narrow = [(*split, "gates", 16) for split in splits]
    narrow += [(100, 16, "barrier", "partials", 16), (100, 16, "tagged", "partials", 16)]
    wide = [
        (hidden, 16, sync, "partials", rows)
        for sync in ("barrier", "tagged")
        for rows in pack_layout.ROW_CHOICES[1:]
        for hidden in (100, 128)
    ]
    return narrow + wide


def dump(folder: Path, only: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for precision in ("tf32", "ieee"):
        for case in CASES:
            masks = case[5] or "none"
            for hidden in () if only == "split" else (100, 128, 256):
                with pytest.MonkeyPatch.context() as monkeypatch:
                    recorders = _record(triton_lstm, monkeypatch)
                    monkeypatch.setenv(triton_lstm.ENV_PRECISION, precision)
                    inputs = kernels_test._inputs((*case[:3], hidden, *case[4:]))
                    kernels_test._run(triton_lstm.TritonMaskedLSTM.apply, inputs)
                    _write(folder, f"rows-{hidden}-{precision}-{masks}", recorders)
            for hidden, units, sync, handoff, rows in () if only == "rows" else _splits():
                if rows > pack_layout.widest_rows(precision, sync):
                    continue
                with pytest.MonkeyPatch.context() as monkeypatch:
                    recorders = _record(triton_split, monkeypatch)
                    # Batch 100 for the wide layouts: one row block at 128 rows, two at 64.
                    batch = case[2] if rows == triton_split.BLOCK_ROWS else 100
                    inputs = kernels_test._inputs((*case[:2], batch, hidden, *case[4:]))
                    apply = kernels_test._split_apply(precision, units, sync, handoff, rows)
                    kernels_test._run(apply, inputs)
                    # Names as before the variants: the barrier, gates and 16 rows add no suffix.
                    suffix = "".join(f"-{v}" for v in (sync, handoff) if v not in DEFAULTS)
                    if rows != triton_split.BLOCK_ROWS:
                        suffix = "".join(f"-{v}" for v in (sync,) if v not in DEFAULTS)
                        suffix += f"-rows{rows}"
                    name = f"split-{hidden}-{units}-{precision}-{masks}{suffix}"
                    _write(folder, name, recorders)
    print(f"{len(list(folder.glob('*.sass')))} kernels in {folder}")


def _loop_ops(path: Path) -> tuple[list[str], int]:
    """The operations of the kernel's time loop (the span of its long backward branches), with
    registers, predicates and constants blanked; and the kernel's instruction count."""
    found = re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", path.read_text(), re.MULTILINE)
    code = [(int(address, 16), text) for address, text in found]
    back = [
        (int(target.group(1), 16), address)
        for address, text in code
        if (target := re.search(r"BRA (0x[0-9a-f]+)", text))
        and address - int(target.group(1), 16) > 0x200
    ]
    low, high = (min(b[0] for b in back), max(b[1] for b in back)) if back else (0, 1 << 62)
    blank = r"\.reuse|U?R\d+|U?P\d|B\d|0x[0-9a-f]+"
    return [re.sub(blank, "#", text) for address, text in code if low <= address <= high], len(
        code
    )


def compare(before: Path, after: Path) -> None:
    differing = 0
    for old in sorted(before.glob("*.sass")):
        new = after / old.name
        if not new.exists():
            print(f"{old.stem}: missing in {after}")
            differing += 1
            continue
        (old_loop, old_size), (new_loop, new_size) = _loop_ops(old), _loop_ops(new)
        a, b = collections.Counter(old_loop), collections.Counter(new_loop)
        changed = sum(((a - b) + (b - a)).values())
        if changed or len(old_loop) != len(new_loop):
            differing += 1
            print(
                f"{old.stem}: loop {len(old_loop)} -> {len(new_loop)} instructions, {changed} "
                f"operations differ (kernel {old_size} -> {new_size})"
            )
    total = len(list(before.glob("*.sass")))
    print(f"{total - differing} of {total} kernels run the same operations in their loop")


# What `stats` counts in a time loop: CTA barriers (each a shared-memory layout change or a
# barrier/exchange wait), tensor-core ops (HMMA: mma.sync; HGMMA: Hopper's warpgroup wgmma,
# which tl.dot takes from 64 rows), global loads and stores, and fences.
STATS = {
    "BAR.SYNC": "BAR.SYNC",
    "HMMA": "HMMA",
    "HGMMA": "HGMMA",
    "LDG": "LDG",
    "STG": "STG",
    "MEMBAR": "MEMBAR",
}
# From the dump's .json beside each .sass: warps, registers and spilled bytes per thread, shared
# memory per program ("-" for a dump without them).
RESOURCES = {"warps": "warps", "regs": "registers", "spill": "spill_bytes", "shared": "shared"}


def stats(folder: Path, pattern: str) -> None:
    """Per kernel matching `pattern`: its loop's instruction count, STATS counts and
    RESOURCES."""
    names = [*STATS, *RESOURCES]
    print(f"{'kernel':<64}{'loop':>6}" + "".join(f"{name:>10}" for name in names))
    for path in sorted(folder.glob(f"{pattern}.sass")):
        loop, _ = _loop_ops(path)
        counts = [sum(op in text for text in loop) for op in STATS.values()]
        usage_path = path.with_suffix(".json")
        usage = json.loads(usage_path.read_text()) if usage_path.exists() else {}
        counts += [usage.get(key, "-") for key in RESOURCES.values()]
        print(f"{path.stem:<64}{len(loop):>6}" + "".join(f"{count:>10}" for count in counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dumping = commands.add_parser("dump", help="compile every launch and write its SASS")
    dumping.add_argument("folder", type=Path)
    dumping.add_argument("--only", choices=["rows", "split"])
    comparing = commands.add_parser("compare", help="the kernels whose loops differ")
    comparing.add_argument("before", type=Path)
    comparing.add_argument("after", type=Path)
    counting = commands.add_parser("stats", help="count barriers, tensor-core ops, ... a loop")
    counting.add_argument("folder", type=Path)
    counting.add_argument("--kernels", default="*", help="a glob over the kernel names")
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.folder, args.only)
    elif args.command == "stats":
        stats(args.folder, args.kernels)
    else:
        compare(args.before, args.after)


if __name__ == "__main__":
    main()
