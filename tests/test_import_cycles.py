"""No import cycles in gflowdiff: the package's layers (diffusion → objectives → evaluation → training → experiments →
cli, docs/architecture.md) import downwards only.

Every import statement of every module is an edge: module-level, inside functions (lazy) and under ``TYPE_CHECKING``,
relative ones resolved. ``import a.b`` is an edge to module ``a.b``; ``from a import X`` to ``a.X`` where that is a
module, else to ``a`` (so a package ``__init__``'s re-exports are edges too). A strongly connected component of two or
more modules is a cycle. The modules are found with pkgutil and parsed with ast: nothing is imported.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import gflowdiff


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module and subpackage under the package folder ``root``: dotted name → source file."""
    found = {package: root / "__init__.py"}
    for info in pkgutil.iter_modules([str(root)]):
        name = f"{package}.{info.name}"
        if info.ispkg:
            found.update(module_files(root / info.name, name))
        else:
            found[name] = root / f"{info.name}.py"
    return found


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """The modules of ``known`` that module ``name`` (source ``path``) imports, each with the line of its first
    import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target != name:
            edges.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
                target = next((prefix for prefix in prefixes if prefix in known), None)
                if target is not None:
                    add(target, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    add(f"{source}.{alias.name}", node.lineno)
                elif source in known:
                    add(source, node.lineno)
    return edges


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    files = module_files(root, package)
    return {name: imports_of(name, path, set(files)) for name, path in sorted(files.items())}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    members = set(component)
    return "; ".join(
        f"{source} → {target} (line {line})"
        for source in component
        for target, line in sorted(graph[source].items())
        if target in members
    )


def test_gflowdiff_has_no_import_cycles():
    graph = import_graph(Path(gflowdiff.__file__).parent, "gflowdiff")
    # the walk sees the subpackages, relative/absolute imports and the re-exports of __init__ files
    assert "gflowdiff.objectives.gradient_db.scores" in graph["gflowdiff.objectives.gradient_db.objective"]
    assert "gflowdiff.objectives.gradient_db.residual_nabla_db" in graph["gflowdiff.objectives"]
    assert "gflowdiff.training.loading" in graph["gflowdiff.sample_images"]  # a function-level import
    found = cycles(graph)
    assert not found, "import cycles in gflowdiff:\n" + "\n".join(describe(graph, c) for c in found)


PLANTED = {
    # a → sub.b (relative) → sub.c (lazy, in a function) → a (relative, under TYPE_CHECKING); d only imports a
    "through_lazy_and_type_checking_imports": {
        "__init__.py": "",
        "a.py": "import os\n\nfrom .sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    import planted.sub.c\n\n    return planted.sub.c\n",
        "sub/c.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .. import a\n",
        "d.py": "from planted.a import b\n",
    },
    # a submodule importing a name from its own package, whose __init__ re-exports that submodule's names
    "through_a_package_reexport": {
        "__init__.py": "from planted.x import X\nfrom planted.y import Y\n",
        "x.py": "from planted import Y\n\nX = Y\n",
        "y.py": "Y = 1\n",
    },
}
EXPECTED = {
    "through_lazy_and_type_checking_imports": [["planted.a", "planted.sub.b", "planted.sub.c"]],
    "through_a_package_reexport": [["planted", "planted.x"]],
}
FIXED = {  # the one file that, rewritten so, breaks the planted cycle
    "through_lazy_and_type_checking_imports": ("sub/c.py", ""),
    "through_a_package_reexport": ("x.py", "from planted.y import Y\n\nX = Y\n"),  # from the defining module
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_cycle_is_found(tmp_path, case):
    root = tmp_path / "planted"
    for relative, source in PLANTED[case].items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(source)
    graph = import_graph(root, "planted")
    assert cycles(graph) == EXPECTED[case]
    relative, source = FIXED[case]
    (root / relative).write_text(source)
    assert cycles(import_graph(root, "planted")) == []
