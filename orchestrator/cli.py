"""The ``fastpath`` command.

Subcommands register themselves: every module of :mod:`orchestrator.jobs` (and the modules in
:data:`EXTRA_MODULES`) that defines ``register(registry)`` is imported and adds its commands, so
a later ``jobs/backup.py`` or ``jobs/restore.py`` only has to define::

    def register(registry):
        p = registry.add("backup", run_backup, help="back up a VM")
        p.add_argument(...)

    def run_backup(args, ui):           # ui: orchestrator.progress.Progress
        ...
        return {"id": ...}               # the result; printed as JSON with --json
        # or return (result, exit_code)

Shared conventions (handled here): every command has ``--json`` (one JSON object on stdout,
progress as JSON lines on stderr) and ``--progress``; errors are one line on stderr (and
one error document on stdout with --json, the same shape for every command: :func:`error_document`); exit 0 success, 1 operational failure,
2 usage error. REPO arguments are a path or ``s3://bucket/prefix``; an encrypted repository's
passphrase comes from ``--passphrase-file``, ``FASTPATH_PASSPHRASE`` or a prompt.

Command modules take what they share with this entry point (UsageError, CommandFailed,
add_repo_argument, open_repo) from :mod:`orchestrator.cliutil`, never from here: this module
imports them. Here: the registry, ``main`` (exit codes, output) and the built-in commands
``repo init``, ``list``, ``show`` and ``stats``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import sys
from collections.abc import Callable
from typing import Any

from orchestrator.cliutil import CommandFailed, UsageError, add_repo_argument, open_repo
from orchestrator.progress import MODES, Progress
from orchestrator.repo.errors import RepoError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Command modules outside orchestrator.jobs (none yet); jobs/ modules are discovered.
EXTRA_MODULES: tuple[str, ...] = ()

Runner = Callable[[argparse.Namespace, Progress], Any]


class Registry:
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        self.groups: dict[str, argparse._SubParsersAction] = {}

    def _group(self, group: str) -> argparse._SubParsersAction:
        where = self.groups.get(group)
        if where is None:
            parent, _, last = group.rpartition(" ")
            outer = self._group(parent) if parent else self.sub
            gp = outer.add_parser(last, help=f"{group} commands")
            where = gp.add_subparsers(dest=f"{group.replace(' ', '_')}_command", metavar="COMMAND")
            where.required = True
            self.groups[group] = where
        return where

    def add(
        self, name: str, run: Runner, *, help: str, group: str | None = None
    ) -> argparse.ArgumentParser:
        """Add ``fastpath NAME`` (or ``fastpath GROUP NAME``; GROUP may be two words:
        ``fastpath repo key list``) running ``run(args, ui)``."""
        where = self.sub if group is None else self._group(group)
        p = where.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument(
            "--progress",
            choices=MODES,
            default="auto",
            help="progress display on stderr (default: bar on a TTY, lines otherwise)",
        )
        p.set_defaults(_run=run, _name=f"{group} {name}" if group else name)
        return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastpath",
        description="xcp-fastpath orchestrator: deduplicated backups of XCP-ng disks",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log warnings (-v: retries given up, ...) or everything (-vv) on stderr",
    )
    registry = Registry(parser)
    _register_builtin(registry)
    import orchestrator.jobs as jobs

    names = sorted(m.name for m in pkgutil.iter_modules(jobs.__path__))
    modules = [f"orchestrator.jobs.{n}" for n in names] + list(EXTRA_MODULES)
    for modname in modules:
        module = importlib.import_module(modname)
        register = getattr(module, "register", None)
        if register is not None:
            register(registry)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so a usage error with --json still prints the
    error document (subcommand parsers inherit the class)."""

    def error(self, message: str):  # type: ignore[override]
        raise _ArgparseError(self, message)


class _ArgparseError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


def error_document(message: str, kind: str, exit_code: int, exc: BaseException | None = None):
    """The one shape of every error on stdout with --json (docs/cli.md "Errors"):
    ``{"ok": false, "error": one line, "type": "usage"|"failed"|"interrupted",
    "exception": class name or null, "exit_code": n}``, plus whatever fields a command's
    :class:`CommandFailed` result carries (it never overrides these)."""
    return {
        "ok": False,
        "error": message,
        "type": kind,
        "exception": type(exc).__name__ if exc is not None else None,
        "exit_code": exit_code,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    want_json = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgparseError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        if want_json:
            print(json.dumps(error_document(_one_line(exc), "usage", EXIT_USAGE), sort_keys=True))
        return EXIT_USAGE
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_usage(sys.stderr)
        print("fastpath: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.verbose)
    ui = Progress.create(args.progress, json_output=args.json)
    name = args._name

    def fail(exc: BaseException, kind: str, code: int, line: str, extra=None) -> int:
        ui.close()
        doc = {**(extra or {}), **error_document(_one_line(exc), kind, code, exc)}
        if args.json:
            print(json.dumps(doc, sort_keys=True, default=str))
        elif extra and getattr(args, "_render_failed", None) is not None:
            # A command may render its failed result for people (e.g. a job's report).
            print(args._render_failed(doc))
        print(f"fastpath {name}: {line}", file=sys.stderr)
        return code

    try:
        outcome = run(args, ui)
    except UsageError as exc:
        return fail(exc, "usage", EXIT_USAGE, f"usage error: {exc}")
    except CommandFailed as exc:
        return fail(exc, "failed", EXIT_FAILURE, _one_line(exc), exc.result)
    except (RepoError, OSError, ValueError) as exc:
        return fail(exc, "failed", EXIT_FAILURE, f"error: {_one_line(exc)}")
    except KeyboardInterrupt as exc:
        return fail(exc, "interrupted", 130, "interrupted")
    finally:
        ui.close()
    code = EXIT_OK
    result = outcome
    if isinstance(outcome, tuple):
        result, code = outcome
    render = getattr(args, "_render", None)
    try:
        _emit(args, result, render)
        sys.stdout.flush()
    except BrokenPipeError:  # `fastpath show ... | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return code


def _setup_logging(verbose: int) -> None:
    """Library warnings (e.g. the S3 retry policy giving up) stay quiet unless asked for: the
    command's own error line says what failed, once. FASTPATH_LOG=debug|info|warning also works."""
    level = {0: logging.ERROR, 1: logging.WARNING}.get(verbose, logging.DEBUG)
    env = os.environ.get("FASTPATH_LOG", "").upper()
    if env in ("DEBUG", "INFO", "WARNING", "ERROR"):
        level = min(level, getattr(logging, env))
    logging.basicConfig(level=level, format="fastpath: %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def _emit(args: argparse.Namespace, result: Any, render: Callable[[Any], str] | None) -> None:
    if result is None:
        return
    if args.json:
        print(json.dumps(result, sort_keys=True, default=str))
    elif render is not None:
        text = render(result)
        if text:
            print(text)
    else:
        print(_plain(result))


def _plain(result: Any, indent: str = "") -> str:
    if isinstance(result, dict):
        lines = []
        for k, v in result.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{indent}{k}:")
                lines.append(_plain(v, indent + "  "))
            else:
                lines.append(f"{indent}{k}: {v}")
        return "\n".join(lines)
    if isinstance(result, list):
        return "\n".join(
            _plain(v, indent + "  ") if isinstance(v, dict | list) else f"{indent}- {v}"
            for v in result
        )
    return f"{indent}{result}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


# -- built-in repository commands: repo init, list, show, stats ---------------------------------


def _register_builtin(registry: Registry) -> None:
    p = registry.add("init", cmd_repo_init, help="create a repository", group="repo")
    p.add_argument("repo", metavar="REPO", help="a directory or s3://bucket/prefix")
    p.add_argument("--encrypt", action="store_true", help="encrypt chunks (AES-256-GCM)")
    p.add_argument("--passphrase-file", metavar="FILE")
    p.add_argument(
        "--compression",
        default="zstd:1",
        metavar="zstd:LEVEL|none",
        help="chunk compression (default zstd:1; zstd:-1..-100 are zstd's fast levels: less "
        "CPU, larger chunks; none: store plain)",
    )

    p = registry.add("list", cmd_list, help="list restore points")
    add_repo_argument(p)
    p.add_argument("--vm", metavar="UUID", help="only this VM")
    p.add_argument("--all", action="store_true", help="include incomplete restore points")
    p.set_defaults(_render=_render_list)

    p = registry.add(
        "show", cmd_show, help="show a restore point (ID = <vm>/<time>, <vm>/latest or latest)"
    )
    add_repo_argument(p)
    p.add_argument("id", metavar="ID")

    p = registry.add("stats", cmd_stats, help="logical vs stored bytes, dedup and compression")
    add_repo_argument(p)


def _check_local_parent(url: str) -> None:
    """A local repository is made only inside a directory that exists: a path under a NAS
    mount point that is not mounted must fail, not become a repository on the local disk."""
    from orchestrator.repo.backends import is_s3_url

    if is_s3_url(url):
        return
    path = os.path.abspath(url[len("file://") :] if url.startswith("file://") else url)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise CommandFailed(
            f"cannot create a repository at {path}: its parent directory {parent} does not "
            f"exist (create it, or mount the storage it belongs to, first)"
        )


def cmd_repo_init(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.repo.config import get_passphrase
    from orchestrator.repo.repository import Repository

    passphrase = None
    if args.encrypt:
        passphrase = get_passphrase(args.passphrase_file, confirm=True)
    elif args.passphrase_file:
        raise UsageError("--passphrase-file needs --encrypt")
    from orchestrator.repo.codec import parse_compression

    try:
        parse_compression(args.compression)
    except ValueError as exc:
        raise UsageError(f"--compression: {exc}") from None
    _check_local_parent(args.repo)
    repo = Repository.init(
        args.repo, encrypt=args.encrypt, passphrase=passphrase, compression=args.compression
    )
    from orchestrator.repo import pins

    pins.record(repo.url, repo.config)  # a new repository here: its pin replaces any old one
    try:
        return {
            "ok": True,
            "repo": repo.url,
            "id": repo.config.id,
            "encrypted": repo.config.encrypted,
            "chunk_size": repo.config.chunk_size,
            "compression": repo.config.compression,
        }
    finally:
        repo.close()


def cmd_list(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.jobs.listing import describe_points

    with _open_for_documents(args, "list") as repo:
        cat = repo.scan()
        points = cat.restore_points(args.vm, None if args.all else True)
        return {
            "ok": True,
            "repo": repo.url,
            "restore_points": describe_points(repo, points, args.concurrency_io),
        }


def _render_list(result: dict[str, Any]) -> str:
    from orchestrator.jobs.listing import render

    return render(result)


def cmd_show(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.jobs.job.names import resolve_point  # <name>/latest as well

    with _open_for_documents(args, "show") as repo:
        point = resolve_point(repo, args.id)
        doc = repo.read_metadata(point)
        return {"ok": True, "id": point.id, "vm": point.vm, "time": point.time, **doc}


def _open_for_documents(args: argparse.Namespace, command: str):
    """Open for a command that reads restore point documents: in an encrypted repository they
    are encrypted, so the passphrase is needed (one-line PassphraseRequired without it)."""
    from orchestrator.repo.errors import PassphraseRequired

    try:
        return open_repo(args)
    except PassphraseRequired as exc:
        if "no passphrase" not in str(exc):
            raise
        raise PassphraseRequired(
            f"the repository at {args.repo} is encrypted (restore point documents too): "
            f"{command} needs its passphrase (FASTPATH_PASSPHRASE or --passphrase-file)"
        ) from None


def cmd_stats(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.jobs.verify import repository_stats

    with open_repo(args, need_key=False) as repo:
        return {"ok": True, "repo": repo.url, **repository_stats(repo, ui)}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
