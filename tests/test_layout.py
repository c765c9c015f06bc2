"""Layout rules of the source tree that a parser can check.

No module under ``agent/`` or ``orchestrator/`` passes 700 lines, and the agent imports only the
standard library (plus ``XenAPIPlugin``, which dom0 gives the plugin).

Imports of ``orchestrator`` (read with ``ast``: module level, inside functions and methods, under
``try``/``if``, and ``importlib.import_module``/``__import__`` of a constant name):

- never ``bench`` (the repository's measurement scripts are not part of the installed package;
  they import the package, not the reverse);
- ``hostsim`` only in the bench command's own modules (orchestrator/benchcmd/ and
  orchestrator/jobs/bench.py), which measure against a simulated host.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTSIM_ALLOWED = ("orchestrator/benchcmd/", "orchestrator/jobs/bench.py")


def _imports(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:  # relative imports stay inside the package
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
                if isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
    return found


def _is(module: str, top: str) -> bool:
    return module == top or module.startswith(top + ".")


def import_violations(root: str) -> dict[str, list[str]]:
    """{"bench": [...], "hostsim": [...]}: "path:line module" of each import breaking the rules."""
    out: dict[str, list[tuple[str, int, str]]] = {"bench": [], "hostsim": []}
    base = os.path.join(root, "orchestrator")
    for dirpath, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            with open(path, encoding="utf-8") as f:
                source = f.read()
            for line, module in _imports(source, rel):
                if _is(module, "bench"):
                    out["bench"].append((rel, line, module))
                if _is(module, "hostsim") and not rel.startswith(HOSTSIM_ALLOWED):
                    out["hostsim"].append((rel, line, module))
    return {k: [f"{r}:{n} {m}" for r, n, m in sorted(v)] for k, v in out.items()}


def test_orchestrator_never_imports_bench():
    assert import_violations(ROOT)["bench"] == []


def test_orchestrator_imports_hostsim_only_in_the_bench_command():
    assert import_violations(ROOT)["hostsim"] == []


def test_import_rules_see_every_form_of_import(tmp_path):
    """The checker on a planted tree: each form of import is caught, allowed places are not."""
    files = {
        "orchestrator/__init__.py": "",
        "orchestrator/cli.py": (
            "import bench.fleet\n"  # 1: module level
            "from orchestrator import bench\n"  # orchestrator.bench: not the bench scripts
            "import benchmark\n"  # another name that merely starts alike
            "from . import hostsim\n"  # relative: orchestrator.hostsim
            "def f():\n"
            "    from bench import fleet\n"  # 6: function level
            "    import hostsim.host as h\n"  # 7
            "class C:\n"
            "    def m(self):\n"
            "        try:\n"
            "            from hostsim.cli import parse_size\n"  # 11: method, under try
            "        except ImportError:\n"
            "            pass\n"
            "import importlib\n"
            "importlib.import_module('hostsim.guest')\n"  # 15
            "__import__('bench')\n"  # 16
        ),
        "orchestrator/jobs/__init__.py": "",
        "orchestrator/jobs/bench.py": "from hostsim.cli import parse_size\n",
        "orchestrator/jobs/backup.py": "def g():\n    from hostsim import guest\n",  # 2
        "orchestrator/benchcmd/__init__.py": "",
        "orchestrator/benchcmd/deep/x.py": "import hostsim\nfrom bench import backup\n",  # 2
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = import_violations(str(tmp_path))
    assert found["bench"] == [
        "orchestrator/benchcmd/deep/x.py:2 bench",
        "orchestrator/cli.py:1 bench.fleet",
        "orchestrator/cli.py:6 bench",
        "orchestrator/cli.py:16 bench",
    ]
    assert found["hostsim"] == [
        "orchestrator/cli.py:7 hostsim.host",
        "orchestrator/cli.py:11 hostsim.cli",
        "orchestrator/cli.py:15 hostsim.guest",
        "orchestrator/jobs/backup.py:2 hostsim",
    ]


# --- room sizes and the agent's dependencies (issue 18) ---

MAX_LINES = 700
# What dom0 gives the agent besides the standard library: XAPI's plugin module (the plugin runs
# inside xapi's plugin host). The compiled speedups are ``agent._speedups``, inside the package.
AGENT_ALLOWED = {"agent", "XenAPIPlugin"}


def oversized_modules(root: str, limit: int = MAX_LINES) -> list[str]:
    """ "path (lines)" of every .py under agent/ and orchestrator/ longer than ``limit`` lines."""
    out = []
    for top in ("agent", "orchestrator"):
        for dirpath, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        n = sum(1 for _ in f)
                    if n > limit:
                        out.append(f"{os.path.relpath(path, root)} ({n})")
    return out


def _agent_sources(root: str):
    """Every Python source of the agent: *.py and the extension-less XAPI plugin."""
    for dirpath, dirs, files in os.walk(os.path.join(root, "agent")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if name.endswith(".py") or os.path.basename(dirpath) == "plugin":
                yield path


def agent_foreign_imports(root: str) -> list[str]:
    """ "path:line module" of each agent import outside the standard library (and AGENT_ALLOWED)."""
    import sys

    out = []
    for path in _agent_sources(root):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for line, module in _imports(source, rel):
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in AGENT_ALLOWED:
                out.append(f"{rel}:{line} {module}")
    return out


def test_no_module_over_700_lines():
    assert oversized_modules(ROOT) == []


def test_agent_imports_only_the_standard_library():
    assert agent_foreign_imports(ROOT) == []


def test_size_and_dependency_rules_catch_a_planted_tree(tmp_path):
    files = {
        "agent/__init__.py": "",
        "agent/big.py": "x = 1\n" * (MAX_LINES + 1),
        "agent/ok.py": "x = 1\n" * (MAX_LINES - 3)
        + "import os\nfrom agent import big\nfrom . import ok\n",
        "agent/dep.py": "def f():\n    import numpy as np\n",
        "agent/plugin/fastpath": "import XenAPIPlugin\nimport requests\n",
        "orchestrator/huge.py": "y = 2\n" * 800,
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert oversized_modules(str(tmp_path)) == ["agent/big.py (701)", "orchestrator/huge.py (800)"]
    assert agent_foreign_imports(str(tmp_path)) == [
        "agent/dep.py:2 numpy",
        "agent/plugin/fastpath:2 requests",
    ]
