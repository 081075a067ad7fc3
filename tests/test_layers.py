"""Layers point one way: no import cycle among flux_sharded's modules, counting every import a
reader could miss (inside a function, under TYPE_CHECKING, relative or absolute), and the stages
never reach up into the runner, the run folder or the validator."""

from __future__ import annotations

import ast
from pathlib import Path

import flux_sharded

PACKAGE = Path(flux_sharded.__file__).parent


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root` (a package by its __init__'s name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its file: `import a.b`,
    `from a import b` (b a module, or a name in a's __init__), `from . import b`, `from ..a import c`,
    at the top, inside functions and under `if TYPE_CHECKING:` alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = next(iter(known)).split(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from a import b` imports the module a.b when there is one, else a name of a
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:  # `import a.b.c` of a name inside a module
                candidate = candidate.rpartition(".")[0]
            if candidate.split(".")[0] == top and candidate != name:
                targets.add(candidate)
    return targets


def import_graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every import below it was searched
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_stages_talk_to_their_share_not_to_the_runner_or_the_run_folder():
    graph = import_graph(PACKAGE)
    above = {"flux_sharded.runner", "flux_sharded.rundir", "flux_sharded.validate", "flux_sharded.cli"}
    reached = {module: sorted(graph[module] & above) for module in graph if module.startswith("flux_sharded.stages")}
    assert {module: found for module, found in reached.items() if found} == {}


def test_the_walk_sees_imports_hidden_in_functions_and_type_checking(tmp_path):
    """The check itself: a cycle closed only through a function-level import, and one closed only
    under TYPE_CHECKING, relative and absolute, are both found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("def helper():\n    from .sub import high\n")
    (package / "sub" / "high.py").write_text("from .. import low\n")
    assert find_cycle(import_graph(package)) == ["pkg.low", "pkg.sub.high", "pkg.low"]

    (package / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.high\n")
    assert find_cycle(import_graph(package)) == ["pkg.low", "pkg.sub.high", "pkg.low"]

    (package / "low.py").write_text("import os\n")  # the cycle gone
    assert find_cycle(import_graph(package)) is None
