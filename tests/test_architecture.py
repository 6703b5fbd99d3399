"""The import graph of the project's own modules, read with ``ast`` (function-level imports included): no cycles,
and the layers of docs/architecture.md only ever import downwards.

    hrtem_core  <-  datagen, mlplatform (never each other)  <-  experiments  <-  benchmarks
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"hrtem_core": ROOT / "hrtem_core", "datagen": ROOT / "datagen", "mlplatform": ROOT / "platform" / "mlplatform",
           "experiments": ROOT / "experiments", "benchmarks": ROOT / "benchmarks"}
# what each package may import besides itself
ALLOWED = {
    "hrtem_core": set(),
    "datagen": {"hrtem_core"},
    "mlplatform": {"hrtem_core"},
    "experiments": {"hrtem_core", "datagen", "mlplatform"},
    "benchmarks": {"hrtem_core", "datagen", "mlplatform", "experiments"},
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the five packages (a package is its ``__init__``)."""
    out = {}
    for top, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = (top, *path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:  # ``a.b.func`` -> ``a.b``
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # ``from pkg import mod`` imports the submodule; ``from mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in SOURCES and (module := resolve(target)) and module != name:
                found.append((module, node.lineno))
    return found


def import_graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    modules = project_modules()
    graph = {name: {} for name in modules}
    for name, path in modules.items():
        for target, line in imports_of(name, path, modules):
            graph[name].setdefault(target, line)
    return modules, graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    modules, graph = import_graph()
    assert {"hrtem_core.dataset", "datagen.pipeline", "mlplatform.train", "experiments.sweep"} <= set(modules)
    assert "hrtem_core.dataset" in graph["datagen.pipeline"]  # module level, absolute
    assert "datagen.recipe" in graph["datagen.pipeline"]  # module level, relative
    assert "mlplatform.train" in graph["experiments.cli"]  # inside a function
    # and a cycle is found when there is one
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 3}}) is None


def test_no_import_cycles():
    modules, graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} imports {b} ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle:\n  " + "\n  ".join(steps))


def test_layers_only_import_downwards():
    modules, graph = import_graph()
    wrong = [f"{modules[a].relative_to(ROOT)}:{line}: {a} imports {b}"
             for a, targets in graph.items() for b, line in targets.items()
             if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]]
    assert not wrong, "imports against the layering of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_architecture_document_lists_every_module():
    """docs/architecture.md is the map of the code: a module it does not name is a module nobody can find."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules, _ = import_graph()
    missing = [name for name, path in modules.items()
               if path.name not in ("__init__.py", "__main__.py") and f"{path.stem}.py" not in text]
    assert not missing, f"docs/architecture.md does not mention: {', '.join(missing)}"
