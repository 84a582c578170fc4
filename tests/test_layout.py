"""The tree's import structure: no import circle, and the model free of Lightning and Hydra.

Why: a circle between two modules (even through an import inside a function) means neither can be read, tested or
moved without the other, and the order of first imports starts to matter. The model is also what export and the
benchmarks use without a trainer, so it must import neither Lightning nor Hydra. Read from the source with ``ast``
(nothing is imported), so the test is exact and fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "data_prep", "bench")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> list[str]:
    """Every module name ``path`` imports, at module level or inside functions (absolute imports: the project's
    style); ``from package import submodule`` counts as importing the submodule."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for imported in _imports(path):
            if imported in modules and imported != name:
                graph[name].add(imported)
    # `from pretrain.model import triton_interpreter` names the submodule, not the package's __init__
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0:
                if all(f"{node.module}.{alias.name}" in modules for alias in node.names):
                    graph[name].discard(node.module)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_the_tree_has_no_import_circle():
    graph = _graph()
    assert len(graph) > 50 and graph["pretrain.train"], "the scan found the project's modules and their imports"
    assert _circles(graph) == []


def test_a_circle_is_found_when_there_is_one():
    """The check itself: two modules importing each other (one of them inside a function) are reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert _circles(graph) == [["a", "b"]]


def test_the_model_imports_neither_lightning_nor_hydra():
    offending = {str(path.relative_to(REPO)): name for path in (REPO / "pretrain" / "model").rglob("*.py")
                 for name in _imports(path) if name.split(".")[0] in ("lightning", "pytorch_lightning", "hydra")}
    assert offending == {}


def test_no_module_imports_a_private_name_or_an_entry_point():
    """What one command shares with another lives in a public module: importing ``_name`` from another module, or a
    ``__main__`` (which runs a command line when imported under its name), ties a command to another's insides."""
    offending = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    node.module.split(".")[0] in PACKAGES:
                offending += [f"{name}: from {node.module} import {alias.name}" for alias in node.names
                              if alias.name.startswith("_") or node.module.endswith("__main__")]
            elif isinstance(node, ast.Import):
                offending += [f"{name}: import {alias.name}" for alias in node.names
                              if alias.name.split(".")[0] in PACKAGES and alias.name.endswith("__main__")]
    assert offending == []
