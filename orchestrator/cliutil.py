"""What command modules share with the ``fastpath`` entry point (:mod:`orchestrator.cli`).

A command module (``orchestrator/jobs/*.py`` defining ``register(registry)``) imports from here,
never from ``orchestrator.cli``, which imports the command modules: this keeps the two apart.

- :class:`UsageError` (exit 2) and :class:`CommandFailed` (exit 1 with a result still printed):
  what ``cli.main`` turns into exit codes and one-line errors;
- :func:`add_repo_argument`: the REPO argument(s) with ``--passphrase-file`` and
  ``--concurrency-io``;
- :func:`open_repo`: open ``args.repo``, asking for the passphrase only when the repository is
  encrypted (from ``--passphrase-file``, ``FASTPATH_PASSPHRASE`` or a prompt).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.repo.repository import Repository


class UsageError(Exception):
    """Bad arguments found after parsing (exit 2)."""


class CommandFailed(Exception):
    """An operational failure with a prepared result (exit 1, result still printed)."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}


def add_repo_argument(p: argparse.ArgumentParser, *, nargs: str | None = None) -> None:
    p.add_argument(
        "repo" if nargs is None else "repos",
        metavar="REPO",
        nargs=nargs,
        help="repository: a directory or s3://bucket/prefix",
    )
    p.add_argument(
        "--passphrase-file", metavar="FILE", help="passphrase of an encrypted repository"
    )
    p.add_argument(
        "--concurrency-io",
        type=int,
        default=16,
        metavar="N",
        help="backend connections / parallel object requests (default 16)",
    )


def open_repo(
    args: argparse.Namespace,
    url: str | None = None,
    *,
    need_key: bool = True,
    shared_passphrase: bool = False,
) -> Repository:
    """Open ``args.repo`` (or ``url``), asking for the passphrase only when it is encrypted.

    ``need_key=False`` (stats, prune, gc, check: metadata only) opens an encrypted repository
    without its data key when no passphrase is at hand (no prompt); a passphrase from
    FASTPATH_PASSPHRASE or --passphrase-file is still checked when given.

    ``--passphrase-file`` given for a repository that is not encrypted is an error
    (NotEncrypted: a job that expects encryption must not write plaintext into a repository
    whose encryption was stripped), unless ``shared_passphrase``: the file was given for
    another repository of the same command too (``copy``, ``repair``). FASTPATH_PASSPHRASE is
    environment, shared by every repository: it is used only where one is encrypted.
    """
    from orchestrator.repo.backends import open_backend
    from orchestrator.repo.config import PASSPHRASE_ENV, get_passphrase, read_config
    from orchestrator.repo.repository import Repository

    target = url or args.repo
    options: dict[str, Any] = {} if str(target).startswith("s3://") else {"create": False}
    backend = open_backend(target, concurrency=getattr(args, "concurrency_io", 16), **options)
    try:
        config = read_config(backend)
        passphrase = None
        pfile = getattr(args, "passphrase_file", None)
        if config.encrypted:
            if need_key or pfile or os.environ.get(PASSPHRASE_ENV):
                passphrase = get_passphrase(pfile)
        elif pfile and not shared_passphrase:
            passphrase = get_passphrase(pfile)  # refused below (or the config was edited)
        return Repository.open(backend, passphrase=passphrase, need_key=need_key)
    except BaseException:
        backend.close()
        raise
