"""Layout rules of the source tree that a parser can check.

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
