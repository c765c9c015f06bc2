"""``fastpath repo forget REPO``: drop this machine's pin of a repository
(:mod:`orchestrator.repo.pins`), to accept deliberately that it changed (re-created, moved,
migrated); the next open pins what it finds then."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.progress import Progress


def register(registry) -> None:
    p = registry.add(
        "forget",
        cmd_forget,
        help="forget this machine's pin of a repository (accept that it changed)",
        group="repo",
    )
    p.add_argument("repo", metavar="REPO", help="repository: a directory or s3://bucket/prefix")


def cmd_forget(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.repo import pins

    key = pins.pin_key(args.repo)
    return {"ok": True, "repo": key, "forgotten": pins.forget(key), "pins": pins.pin_path()}
