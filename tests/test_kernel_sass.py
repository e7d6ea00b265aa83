"""benchmarks/kernel_sass.py: comparing two SASS dumps by the operations of each time loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs triton")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_sass.py"
spec = importlib.util.spec_from_file_location("kernel_sass", SCRIPT)
kernel_sass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_sass)

# A prologue, a loop (long backward branch from 0x0300 to 0x0010) and an exit, in cuobjdump's form.
LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0020*/                   FMUL R2, R{a}, R{b} ;
        /*0300*/              @P0 BRA 0x10 ;
        /*0310*/                   EXIT ;
"""


def _dump(folder: Path, **kernels: str) -> Path:
    folder.mkdir()
    for name, text in kernels.items():
        (folder / f"{name}.sass").write_text(text)
    return folder


def test_same_operations_on_other_registers_match(tmp_path: Path, capsys) -> None:
    before = _dump(tmp_path / "a", k=LOOP.format(a=3, b=5))
    after = _dump(tmp_path / "b", k=LOOP.format(a=7, b=9).replace("MOV R1", "MOV R6"))
    kernel_sass.compare(before, after)
    out = capsys.readouterr().out.strip()
    assert out == "1 of 1 kernels run the same operations in their loop"


def test_an_other_operation_in_the_loop_is_reported(tmp_path: Path, capsys) -> None:
    before = _dump(tmp_path / "a", k=LOOP.format(a=3, b=5), j=LOOP.format(a=3, b=5))
    changed = LOOP.format(a=3, b=5).replace("FMUL", "FADD")
    after = _dump(tmp_path / "b", k=changed, j=LOOP.format(a=3, b=5))
    kernel_sass.compare(before, after)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "k: loop 3 -> 3 instructions, 2 operations differ (kernel 5 -> 5)",
        "1 of 2 kernels run the same operations in their loop",
    ]


def test_a_loop_past_address_0xffff_is_read_whole(tmp_path: Path, capsys) -> None:
    # cuobjdump widens addresses past four hex digits (kernels of over 4096 instructions).
    long_loop = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0020*/                   FMUL R2, R3, R5 ;
        /*10000*/                  FFMA R2, R3, R4, R2 ;
        /*10010*/                  FFMA R2, R3, R4, R2 ;
        /*10020*/              @P0 BRA 0x10 ;
        /*10030*/                  EXIT ;
"""
    before = _dump(tmp_path / "a", k=LOOP.format(a=3, b=5))
    after = _dump(tmp_path / "b", k=long_loop)
    kernel_sass.compare(before, after)
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert first == "k: loop 3 -> 5 instructions, 2 operations differ (kernel 5 -> 7)"


def test_stats_count_the_loop_only(tmp_path: Path, capsys) -> None:
    barrier = "        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n"
    sass = LOOP.format(a=3, b=5).replace("        /*0300*/", barrier + "        /*0300*/")
    folder = _dump(tmp_path / "a", k=sass, other=LOOP.format(a=3, b=5))
    usage = {"warps": 8, "registers": 124, "spill_bytes": 0, "shared": 49152}
    (folder / "k.json").write_text(json.dumps(usage))  # as dump writes it beside the SASS
    kernel_sass.stats(folder, "*")
    header, row, other = capsys.readouterr().out.strip().splitlines()
    assert header.split() == [
        *("kernel", "loop", "BAR.SYNC", "HMMA", "HGMMA", "LDG", "STG", "MEMBAR"),
        *("warps", "regs", "spill", "shared"),
    ]
    # The loop: HMMA, BAR.SYNC, FMUL and its branch; the MOV before and the EXIT after are not.
    assert row.split() == ["k", "4", "1", "1", "0", "0", "0", "0", "8", "124", "0", "49152"]
    assert other.split()[-4:] == ["-"] * 4  # no resources dumped
