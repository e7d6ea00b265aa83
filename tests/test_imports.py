"""The shape of study/: no import cycle (function-level imports count), each heavy library
imported in one place, and no module (benchmarks/ included) over 500 lines but the ones the note
names."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

STUDY = REPO / "study"
BENCHMARKS = REPO / "benchmarks"
# Where each heavy library may be imported (DESIGN.md: boundaries visible, start-up fast).
HOMES = {
    "ray": ("study/runner/",),
    "mlflow": ("study/tracking/",),
    "matplotlib": ("study/analysis/figures.py",),
    "optuna": ("study/runner/",),
}
# Long by necessity: the Triton kernels (one kernel's protocol reads best in one file), and the
# statistics, whose records and estimators share helpers (see the note of issue 15).
LONG_MODULES = {
    "study/models/triton_lstm.py",
    "study/models/triton_split.py",
    "study/analysis/stats.py",
    # Issue 5's step benchmark, whose helpers (shapes, the random task, timing, the study's pack
    # step) the cost sweep reuses: its rows are what benchmarks/results/h100.txt recorded.
    "benchmarks/lstm_step_cuda.py",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: str = "study") -> set[str]:
    """Every name a file imports, at any depth of its code (functions, TYPE_CHECKING blocks),
    as dotted paths: `from study.x import f` gives study.x.f; `package` is the file's own,
    against which relative imports resolve."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in STUDY.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in imports_of(path, package):
            # The longest prefix that is one of our modules: `from study.models import
            # triton_lstm` imports the module study.models.triton_lstm, `from study.x import f`
            # the module study.x. (Importing a submodule runs its parent packages' __init__
            # first, as every import does; that is not counted as depending on them.)
            parts = imported.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    targets.add(candidate)
                    break
        edges[name] = targets - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_study():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    first = tmp_path / "a.py"
    first.write_text("def f():\n    from study.b import g\n")
    assert "study.b.g" in imports_of(first)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_heavy_libraries_are_imported_in_one_place():
    for path in sorted(STUDY.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        for imported in imports_of(path):
            library = imported.split(".")[0]
            if library in HOMES:
                assert relative.startswith(HOMES[library]), f"{relative} imports {library}"


def test_no_module_is_over_500_lines_but_the_named_ones():
    long = {
        path.relative_to(REPO).as_posix()
        for path in [*STUDY.rglob("*.py"), *BENCHMARKS.glob("*.py")]
        if len(path.read_text().splitlines()) > 500
    }
    assert long <= LONG_MODULES, long - LONG_MODULES
