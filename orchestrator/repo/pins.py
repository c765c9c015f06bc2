"""The client-side pin of each repository this machine has opened: ``repositories.json``.

An attacker with write access to the repository storage (but not to this machine) can make an
encrypted repository look like an unencrypted one (config ``encryption: null``, ``keys/``
moved away), or like an old version 1 one, or replace it with another repository. Nothing in
the storage can tell: so the client remembers, per repository URL, what it saw last time::

    {"format": "xcp-fastpath-pins", "version": 1,
     "repositories": {"/srv/backups": {"id": "<32 hex>", "encrypted": true, "version": 2,
                                        "first_seen": "...", "last_seen": "..."}}}

Opening a repository whose pin says encrypted (or version 2) while it now looks unencrypted
(or version 1), or whose id changed, is refused (:class:`RepositoryChanged`) until the change
is accepted deliberately (``fastpath repo forget REPO`` or ``--accept-repository-change``).
Unencrypted -> encrypted, version 1 -> 2 are upgrades: the pin follows.

The file lives in ``$FASTPATH_STATE_DIR`` (default ``/var/lib/fastpath`` for root, else
``$XDG_STATE_HOME/fastpath`` or ``~/.local/state/fastpath``). It is rewritten atomically
(temporary file, fsync, rename, under an flock) when a record changes. If it cannot be read or
written the client warns once and goes on: a backup never fails for its own state file.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from orchestrator.atomicfile import write_atomically
from orchestrator.repo.errors import Tampered

STATE_DIR_ENV = "FASTPATH_STATE_DIR"
PIN_FILE = "repositories.json"
PIN_FORMAT = "xcp-fastpath-pins"

_lock = threading.Lock()
_warned = False


class RepositoryChanged(Tampered):
    """The repository no longer matches what this machine pinned for its URL."""

    LIMIT = 500  # names the repository twice and the pin file, and what to do


def state_dir() -> str:
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return env
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/fastpath"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.expanduser("~/.local/state")
    return os.path.join(base, "fastpath")


def pin_path() -> str:
    return os.path.join(state_dir(), PIN_FILE)


def pin_key(url: str | os.PathLike[str]) -> str:
    """The key of a repository in the pin file: what its backend calls its URL."""
    text = os.fspath(url)
    if text.startswith("s3://"):
        from orchestrator.repo.backends.s3 import parse_s3_url

        bucket, prefix = parse_s3_url(text)
        return f"s3://{bucket}/{prefix}".rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    return os.path.abspath(text)


def _warn(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"fastpath: warning: {message}", file=sys.stderr)


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _warn(f"cannot read the repository pins {path} ({exc}); not checking them")
        return {}
    repos = doc.get("repositories") if isinstance(doc, dict) else None
    if not isinstance(repos, dict) or doc.get("format") != PIN_FORMAT:
        _warn(f"{path} is not a repository pin file; not checking it")
        return {}
    return repos


def _record(config) -> dict[str, Any]:
    return {"id": config.id, "encrypted": config.encrypted, "version": config.version}


def check(url: str, config, *, accept: bool = False) -> None:
    """RepositoryChanged if ``config`` (just read from ``url``) is a downgrade of, or another
    repository than, what this machine pinned for ``url``."""
    if accept:
        return
    path = pin_path()
    with _lock:
        pinned = _load(path).get(pin_key(url))
    if not isinstance(pinned, dict):
        return
    now = _record(config)
    changed = []
    if pinned.get("id") != now["id"]:
        changed.append(f"its id changed ({str(pinned.get('id'))[:8]}... -> {now['id'][:8]}...)")
    if pinned.get("encrypted") and not now["encrypted"]:
        changed.append("it no longer says it is encrypted")
    if isinstance(pinned.get("version"), int) and now["version"] < pinned["version"]:
        changed.append(f"its format version went from {pinned['version']} to {now['version']}")
    if changed:
        raise RepositoryChanged(
            f"{url}: {' and '.join(changed)} since this machine pinned it ({path}): edited or "
            f"replaced; refusing to open. If deliberate: fastpath repo forget {url} (or "
            f"--accept-repository-change)"
        )


def record(url: str, config) -> None:
    """Pin ``config`` for ``url`` (after a successful open or init). Warns once on failure."""
    _update(url, _record(config))


def forget(url: str) -> bool:
    """Drop the pin of ``url``; False if there was none."""
    return _update(url, None, strict=True)


def _update(url: str, rec: dict[str, Any] | None, *, strict: bool = False) -> bool:
    path = pin_path()
    key = pin_key(url)
    try:
        with _lock:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(path + ".lock", "a") as lock:
                import fcntl

                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                repos = _load(path)
                old = repos.get(key)
                if rec is None:
                    if old is None:
                        return False
                    del repos[key]
                else:
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    same = isinstance(old, dict) and all(old.get(k) == v for k, v in rec.items())
                    if same:
                        return True
                    kept = isinstance(old, dict) and old.get("id") == rec["id"]
                    first = old.get("first_seen", stamp) if kept else stamp
                    repos[key] = {**rec, "first_seen": first, "last_seen": stamp}
                _write(path, {"format": PIN_FORMAT, "version": 1, "repositories": repos})
                return True
    except OSError as exc:
        if strict:
            raise
        _warn(f"cannot write the repository pins {path} ({exc.strerror or exc}); going on")
        return False


def _write(path: str, doc: dict[str, Any]) -> None:
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    write_atomically(path, text.encode("utf-8"), mode=0o600, sync_dir=True)
