"""Tests of the package's layers (docs/source/layout.md): the imports between
pyro_iwae's modules, those inside functions included, form no cycle and never
go up a layer, and no module is over MAX_LINES lines.

Layers, bottom first: ``errors``, ``data``; ``nn``; ``infer``; ``compiled``;
``runs``; the package ``__init__`` re-exports them all, and the command line
(``pyro_iwae_cli``) is on top. Only explicit imports count: importing a
submodule also runs its packages' ``__init__``, which is not an edge here.

Run as a script, it lists the functions over MAX_FUNCTION_LINES lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyro_iwae"

MAX_LINES = 550

#: Modules allowed past MAX_LINES, with the reason.
LONG_MODULES: dict[str, str] = {}

MAX_FUNCTION_LINES = 60

#: What each layer must not import (by module name prefix).
FORBIDDEN = {
    "pyro_iwae.nn": ("pyro_iwae.infer", "pyro_iwae.compiled", "pyro_iwae.runs"),
    "pyro_iwae.infer": ("pyro_iwae.compiled", "pyro_iwae.runs"),
    "pyro_iwae.compiled": ("pyro_iwae.runs",),
    "pyro_iwae.data": ("pyro_iwae.nn", "pyro_iwae.infer", "pyro_iwae.runs"),
    "pyro_iwae.errors": ("pyro_iwae.",),
}


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Each module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that ``name`` imports anywhere in its file (top
    level, functions, ``TYPE_CHECKING`` blocks), with the first line of each;
    ``from P import N`` counts as importing ``P.N`` where that is a module, else
    ``P``. Imports of ``pyro_iwae_cli`` count too, under that name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        top = target.partition(".")[0]
        if top in ("pyro_iwae", "pyro_iwae_cli"):
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of names (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in graph.get(node, {}):
            if state.get(succ) == 1:
                return path[path.index(succ) :] + [succ]
            if succ not in state and (cycle := visit(succ)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_module_scan_sees_every_layer_and_nested_imports():
    graph = import_graph()
    for layer in ("nn", "infer", "compiled", "runs"):
        assert f"pyro_iwae.{layer}" in graph
    # Known edges, one of them made inside a function (tracking's images).
    assert "pyro_iwae.infer.traces" in graph["pyro_iwae.infer.particles"]
    assert "pyro_iwae.infer.sampling" in graph["pyro_iwae.runs.tracker"]
    assert "pyro_iwae.infer.hooks" in graph["pyro_iwae.compiled"]


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"b": 1}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"a": 1}}) == ["a", "a"]


def test_a_function_level_import_is_an_edge(tmp_path):
    root = tmp_path / "pyro_iwae"
    (root / "infer").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "infer" / "__init__.py").write_text("")
    (root / "infer" / "a.py").write_text("def f():\n    from ..runs import b\n")
    (root / "runs.py").write_text("from .infer.a import f\n")
    modules = module_files(root)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["pyro_iwae.infer.a"] == {"pyro_iwae.runs": 2}
    assert find_cycle(graph) == [
        "pyro_iwae.infer.a",
        "pyro_iwae.runs",
        "pyro_iwae.infer.a",
    ]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_a_layer_above_it(layer):
    wrong = [
        f"{name}:{line} imports {target}"
        for name, targets in import_graph().items()
        if name == layer or name.startswith(layer + ".")
        for target, line in targets.items()
        if any(target.startswith(above) for above in FORBIDDEN[layer])
    ]
    assert not wrong, "\n".join(wrong)


def test_the_library_never_imports_the_command_line():
    wrong = [
        f"{name}:{line}"
        for name, targets in import_graph().items()
        for target, line in targets.items()
        if target.startswith("pyro_iwae_cli")
    ]
    assert not wrong, wrong


def test_no_module_is_too_long():
    lengths = {
        name: len(path.read_text().splitlines())
        for name, path in module_files().items()
    }
    too_long = {name for name, n in lengths.items() if n > MAX_LINES}
    too_long -= LONG_MODULES.keys()
    assert not too_long, {name: lengths[name] for name in too_long}
    # An exception that is no longer needed goes.
    assert all(lengths[name] > MAX_LINES for name in LONG_MODULES)


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str]]:
    """``(lines, "module:function")`` of the functions over ``limit`` lines
    (docstrings included), longest first."""
    found = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append((length, f"{name}:{node.name}"))
    return sorted(found, reverse=True)


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else MAX_FUNCTION_LINES
    for length, where in long_functions(limit):
        print(f"{length:4d}  {where}")
