"""``fastpath repo passwd`` and ``fastpath repo key list|add|export``: the key files of an
encrypted repository (:mod:`orchestrator.repo.keyring`). The data is never re-encrypted.

The current passphrase comes from ``--passphrase-file``, ``FASTPATH_PASSPHRASE`` or a prompt; a
new one from ``--new-passphrase-file``, ``FASTPATH_NEW_PASSPHRASE`` or a prompt (asked twice).
"""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.cliutil import UsageError, add_repo_argument, open_repo
from orchestrator.progress import Progress

NEW_OPTION = "--new-passphrase-file"


def register(registry) -> None:
    p = registry.add(
        "passwd",
        cmd_passwd,
        help="change the passphrase (re-wraps the data key only)",
        group="repo",
    )
    add_repo_argument(p)
    _new_passphrase_argument(p)

    p = registry.add("list", cmd_key_list, help="list the key files", group="repo key")
    add_repo_argument(p)
    p.set_defaults(_render=_render_list)

    p = registry.add(
        "add",
        cmd_key_add,
        help="add a key: a second passphrase, or (--from FILE) an exported key file",
        group="repo key",
    )
    add_repo_argument(p)
    _new_passphrase_argument(p)
    p.add_argument("--label", default="", help="a note stored with the key (not secret)")
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="import this exported key file; --passphrase-file is then its passphrase",
    )

    p = registry.add(
        "export",
        cmd_key_export,
        help="write a key file outside the repository (paper backup)",
        group="repo key",
    )
    add_repo_argument(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it")
    p.add_argument(
        NEW_OPTION,
        metavar="FILE",
        help="passphrase of the exported key (default: the current passphrase)",
    )
    p.add_argument("--label", default="", help="a note stored with the key (not secret)")
    p.add_argument("--force", action="store_true", help="overwrite FILE")


def _new_passphrase_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(NEW_OPTION, metavar="FILE", help="the new passphrase (first line)")


def _new_passphrase(args: argparse.Namespace) -> str:
    from orchestrator.repo.config import NEW_PASSPHRASE_ENV, get_passphrase

    return get_passphrase(
        args.new_passphrase_file,
        confirm=True,
        what="new key",
        env_name=NEW_PASSPHRASE_ENV,
        option=NEW_OPTION,
    )


def cmd_passwd(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.repo.keyring import change_passphrase

    with open_repo(args) as repo:
        new = _new_passphrase(args)
        done = change_passphrase(repo, new)
        return {"ok": True, "repo": repo.url, "changed": True, **done}


def cmd_key_list(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.repo.keyring import list_keys

    with open_repo(args) as repo:
        return {"ok": True, "repo": repo.url, "keys": list_keys(repo)}


def cmd_key_add(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.repo.keyring import add_key, list_keys

    if args.from_file:
        if args.new_passphrase_file or args.label:
            raise UsageError("--from imports a key as it is: no --new-passphrase-file, --label")
        return _import(args)
    with open_repo(args) as repo:
        done = add_key(repo, _new_passphrase(args), args.label)
        return {"ok": True, "repo": repo.url, **done, "keys": len(list_keys(repo))}


def _import(args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.repo.backends import open_backend
    from orchestrator.repo.config import get_passphrase
    from orchestrator.repo.keyring import import_key

    try:
        with open(args.from_file, "rb") as f:
            blob = f.read(1 << 20)
    except OSError as exc:
        raise UsageError(f"cannot read {args.from_file}: {exc.strerror}") from None
    options = {} if str(args.repo).startswith("s3://") else {"create": False}
    backend = open_backend(args.repo, concurrency=args.concurrency_io, **options)
    try:
        passphrase = get_passphrase(args.passphrase_file, what=f"key file {args.from_file}")
        done = import_key(backend, blob, passphrase, str(args.from_file))
        return {"ok": True, "repo": backend.url, "imported": str(args.from_file), **done}
    finally:
        backend.close()


def cmd_key_export(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.repo.config import get_passphrase
    from orchestrator.repo.keyring import export_key

    with open_repo(args) as repo:
        if args.new_passphrase_file:
            passphrase = _new_passphrase(args)
        else:
            passphrase = get_passphrase(args.passphrase_file)  # the one that opened it
        done = export_key(repo, args.output, passphrase, label=args.label, force=args.force)
        return {"ok": True, "repo": repo.url, **done}


def _render_list(result: dict[str, Any]) -> str:
    lines = []
    for k in result["keys"]:
        mark = "*" if k.get("current") else " "
        if "error" in k:
            lines.append(f"{mark} {k['key']}  unreadable: {k['error']}")
        else:
            label = f"  {k['label']}" if k.get("label") else ""
            lines.append(f"{mark} {k['key']}  v{k['version']}  {k['created'] or '-'}{label}")
    return "\n".join(lines)
