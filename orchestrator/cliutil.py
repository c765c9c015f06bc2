"""What command modules share with the ``fastpath`` entry point (:mod:`orchestrator.cli`).

A command module (``orchestrator/jobs/*.py`` defining ``register(registry)``) imports from here,
never from ``orchestrator.cli``, which imports the command modules: this keeps the two apart.

- :class:`UsageError` (exit 2) and :class:`CommandFailed` (exit 1 with a result still printed):
  what ``cli.main`` turns into exit codes and one-line errors;
- :func:`add_repo_argument`: the REPO argument(s) with ``--passphrase-file`` and
  ``--concurrency-io``;
- :func:`open_repo`: open ``args.repo``, asking for the passphrase only when the repository is
  encrypted (from ``--passphrase-file``, ``FASTPATH_PASSPHRASE`` or a prompt), checked against
  this machine's pin of the repository (:mod:`orchestrator.repo.pins`);
- :func:`check_copy_ends`: what ``copy``, ``repair --from`` and a job's ``copy-to`` refuse
  (an encrypted source into an unencrypted destination, without ``--allow-plaintext``).
"""

from __future__ import annotations

import argparse
import os
import sys
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
    add_safety_arguments(p)


def add_safety_arguments(p: argparse.ArgumentParser, *, legacy: bool = True) -> None:
    """``--accept-repository-change`` (and, for commands that read, ``--legacy-v1``)."""
    if legacy:
        p.add_argument(
            "--legacy-v1",
            action="store_true",
            help="open an encrypted repository of format version 1 (unauthenticated metadata: "
            "only to migrate it; also FASTPATH_ALLOW_LEGACY_V1=1)",
        )
    p.add_argument(
        "--accept-repository-change",
        action="store_true",
        help="open a repository that no longer matches this machine's pin of it (id, "
        "encryption or format version changed) and pin it anew",
    )


def add_plaintext_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="allow copying from an encrypted repository into an unencrypted one",
    )


def passphrase_given(args: argparse.Namespace) -> bool:
    """A passphrase was given (``--passphrase-file`` or FASTPATH_PASSPHRASE), not prompted."""
    from orchestrator.repo.config import PASSPHRASE_ENV

    return bool(getattr(args, "passphrase_file", None) or os.environ.get(PASSPHRASE_ENV))


def check_copy_ends(
    src: Repository, dst: Repository, *, allow_plaintext: bool, passphrase: bool
) -> None:
    """Data flows from ``src`` to ``dst``. Refuse an encrypted ``src`` into an unencrypted
    ``dst`` (unless ``allow_plaintext``: stripped encryption looks exactly like that), and a
    ``passphrase`` given when neither end is encrypted. Unencrypted into encrypted is fine."""
    from orchestrator.repo.errors import NotEncrypted, PlaintextRefused

    if src.config.encrypted and not dst.config.encrypted and not allow_plaintext:
        raise PlaintextRefused(
            f"{src.url} is encrypted, {dst.url} is not: refusing to store its data there in "
            f"plaintext (was its encryption stripped?); to allow it: --allow-plaintext (job "
            f"file: copy-allow-plaintext = true)"
        )
    if passphrase and not src.config.encrypted and not dst.config.encrypted:
        raise NotEncrypted(
            f"neither {src.url} nor {dst.url} is encrypted, but a passphrase was given: "
            f"refusing (if one was encrypted, its encryption was stripped)"
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

    A passphrase given (``--passphrase-file`` or FASTPATH_PASSPHRASE) for a repository that is
    not encrypted is an error (NotEncrypted: a job that expects encryption must not write
    plaintext into a repository whose encryption was stripped), unless ``shared_passphrase``:
    it serves another repository of the same command too (``copy``, ``repair``, ``copy-to``),
    whose caller then applies :func:`check_copy_ends`.

    Before any passphrase is used the config is checked against this machine's pin of the
    repository (``--accept-repository-change`` skips that); after a successful open it is
    pinned (:mod:`orchestrator.repo.pins`).
    """
    from orchestrator.repo import pins
    from orchestrator.repo.backends import open_backend
    from orchestrator.repo.config import get_passphrase, read_config
    from orchestrator.repo.repository import Repository

    target = url or args.repo
    options: dict[str, Any] = {} if str(target).startswith("s3://") else {"create": False}
    backend = open_backend(target, concurrency=getattr(args, "concurrency_io", 16), **options)
    try:
        config = read_config(backend)
        pins.check(
            backend.url, config, accept=bool(getattr(args, "accept_repository_change", False))
        )
        passphrase = None
        pfile = getattr(args, "passphrase_file", None)
        given = passphrase_given(args)
        if config.encrypted:
            if need_key or given:
                passphrase = get_passphrase(pfile)
        elif given and not shared_passphrase:
            passphrase = get_passphrase(pfile, prompt=False)  # refused by Repository.open
        repo = Repository.open(
            backend,
            passphrase=passphrase,
            need_key=need_key,
            allow_legacy_v1=True if getattr(args, "legacy_v1", False) else None,
        )
        if repo.config.encrypted and repo.config.version == 1:
            print(
                f"fastpath: WARNING: {backend.url} is an encrypted repository of format version "
                f"1: nothing read from it is authenticated; migrate it (fastpath repo init "
                f"--encrypt NEW with a NEW passphrase; fastpath copy --legacy-v1 OLD NEW)",
                file=sys.stderr,
            )
        pins.record(backend.url, repo.config)
        return repo
    except BaseException:
        backend.close()
        raise
