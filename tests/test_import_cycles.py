"""Layout rules of the source tree, checked on the source itself (``ast``, nothing imported).

Import cycles among ``orchestrator.*`` modules (issue 18): none allowed. **Every** import
statement counts, wherever it stands: at module level, under ``if TYPE_CHECKING:``, or inside a
function. A lazy import inside a function is how a circle hides (cli ↔ jobs.verify was one), and a
circle of type-only imports is still two modules that each need the other (repo.codec ↔
repo.config was one): both are design circles, so both fail here. What does not count:

- ``importlib.import_module(name)``: the CLI's discovery of command modules by name, which is
  one way by construction (``orchestrator.cli`` → ``orchestrator.jobs.*``);
- the implicit import of parent packages: importing ``orchestrator.repo.backends.local`` runs
  ``orchestrator/repo/backends/__init__.py``, whose ``open_backend`` imports ``local`` lazily; a
  package picking one of its own implementations is not a circle between two modules.

An edge goes to the module an import names: ``from a.b import c`` is an edge to ``a.b.c`` when
that is a module of the tree, else to ``a.b``; ``import a.b.c`` to the longest prefix that is one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(root: Path, package: str) -> dict[str, dict[str, list[int]]]:
    """module -> {imported module of the same tree -> line numbers of the imports}."""
    modules = _modules(root, package)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, list[int]]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, list[int]] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    child = f"{source}.{alias.name}"
                    targets.append(child if child in modules else known(source))
            for target in targets:
                if target is not None and target != name:
                    edges.setdefault(target, []).append(node.lineno)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe_cycle(graph: dict[str, dict[str, list[int]]], component: list[str]) -> str:
    """One concrete circle through the component's first module, with the import lines."""
    start = component[0]
    members = set(component)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth first: the shortest way back to ``start``
        v = todo.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = paths[v] + [start]
                hops = [f"{a} --(line {graph[a][b][0]})--> {b}" for a, b in zip(path, path[1:])]
                return "; ".join(hops)
            if w in members and w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no circle through {start}")  # pragma: no cover


def test_no_import_cycles_among_orchestrator_modules():
    graph = import_graph(ROOT, "orchestrator")
    assert "orchestrator.repo.repository" in graph and "orchestrator.cli" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among orchestrator modules:\n" + "\n".join(
        describe_cycle(graph, c) for c in cycles
    )


def test_cycle_finder_sees_lazy_type_only_and_relative_imports(tmp_path):
    """The finder itself: each kind of import that counts closes a circle it reports, and an
    import of a sibling through its package does not invent one."""
    files = {
        "__init__.py": "",
        # module level one way, inside a function the other
        "a.py": "from pkg.b import thing\n",
        "b.py": "thing = 1\n\ndef late():\n    from pkg import a\n    return a\n",
        # under TYPE_CHECKING only
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import D\n",
        "d.py": "import pkg.c\nD = 1\n",
        # relative imports, both spellings
        "e.py": "from . import f\n",
        "f.py": "from .e import x\n",
        # no circle: g imports h and h's package; h imports nothing of the tree
        "g.py": "import pkg.h as h\nimport pkg\n",
        "h.py": "import json\n",
        # a subpackage whose __init__ imports a child lazily: not a circle
        "sub/__init__.py": "def pick():\n    from pkg.sub import impl\n    return impl\n",
        "sub/impl.py": "from pkg.sub.base import Base\n",
        "sub/base.py": "class Base: ...\n",
    }
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.a": [4]}
    assert graph["pkg.g"] == {"pkg.h": [1], "pkg": [2]}
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"], ["pkg.e", "pkg.f"]]
    assert describe_cycle(graph, cycles[0]) == (
        "pkg.a --(line 1)--> pkg.b; pkg.b --(line 4)--> pkg.a"
    )
