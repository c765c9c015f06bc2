"""Managing the key files of an encrypted repository: change a passphrase, add a second key,
export one (a paper backup kept outside the repository) and import it back, list them.

None of this touches the data: every key file wraps the same data key, so changing or adding a
passphrase rewrites one small ``keys/<id>`` object and never re-encrypts a chunk. Each new key
file carries the config MAC (:mod:`orchestrator.repo.keys`), computed with the data key the
repository was opened with, so a key can only be added to the repository it belongs to.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from orchestrator.atomicfile import write_atomically
from orchestrator.repo.config import _test_kdf_n, key_names, read_config
from orchestrator.repo.errors import NotEncrypted, NotFound, RepoError, RepoExists, UnknownFormat
from orchestrator.repo.keys import (
    KEYS_PREFIX,
    KeyFile,
    MetadataKeys,
    check_config_mac,
    new_key_file,
    parse_key_file,
)

if TYPE_CHECKING:
    from orchestrator.repo.backends.base import Backend
    from orchestrator.repo.repository import Repository


def _opened(repo: Repository) -> tuple[KeyFile, bytes, MetadataKeys]:
    u = repo.unlocked
    if not repo.config.encrypted:
        raise NotEncrypted(f"the repository at {repo.url} is not encrypted: it has no keys")
    if repo.legacy:
        raise RepoError(
            f"{repo.url} is an encrypted repository of format version 1: its keys cannot be "
            f"changed; copy it into a new one (fastpath repo init --encrypt NEW; fastpath copy)"
        )
    if u is None or u.key is None or u.data_key is None or u.keys is None:
        raise RepoError(f"{repo.url}: opened without its passphrase")
    return u.key, u.data_key, u.keys


def _make(repo: Repository, passphrase: str, *, key_id: str | None, label: str):
    key, data_key, keys = _opened(repo)
    mac = keys.config_mac(repo.config.canonical_bytes())
    name, blob = new_key_file(
        data_key, passphrase, repo.config.id, mac, scrypt_n=_test_kdf_n(), key_id=key_id,
        label=label,
    )  # fmt: skip
    # read back what we are about to store: it must open with the new passphrase
    made = parse_key_file(blob, name, name)
    if made.unwrap(passphrase, repo.config.id, name) != data_key:
        raise RepoError(f"{name}: the new key file does not unwrap (not stored)")
    return name, blob, made


def change_passphrase(repo: Repository, new_passphrase: str) -> dict[str, Any]:
    """Re-wrap the data key of the key file that opened ``repo`` under ``new_passphrase``
    (same key id, one atomic overwrite); the old passphrase no longer opens that key."""
    key, _data_key, _keys = _opened(repo)
    name, blob, made = _make(repo, new_passphrase, key_id=key.id, label=key.label)
    repo.backend.put(name, blob)
    return {"key": name, "id": made.id}


def add_key(repo: Repository, passphrase: str, label: str = "") -> dict[str, Any]:
    """A new key file (a second passphrase) in ``keys/``."""
    name, blob, made = _make(repo, passphrase, key_id=None, label=label)
    if not repo.backend.put_if_absent(name, blob):
        raise RepoExists(f"{repo.url}/{name} exists")
    return {"key": name, "id": made.id, "label": made.label}


def export_key(
    repo: Repository, path: str, passphrase: str, *, label: str = "", force: bool = False
) -> dict[str, Any]:
    """Write a key file wrapped under ``passphrase`` to the local file ``path`` (mode 0600),
    not to the repository: a paper backup, imported back with :func:`import_key`."""
    name, blob, made = _make(repo, passphrase, key_id=None, label=label or "exported")
    if os.path.lexists(path) and not force:
        raise RepoError(f"{path} exists: give --force to overwrite it")
    write_atomically(path, blob, mode=0o600)
    return {"output": path, "id": made.id, "key": name}


def import_key(backend: Backend, blob: bytes, passphrase: str, where: str) -> dict[str, Any]:
    """Store an exported key file in ``keys/`` after checking that ``passphrase`` opens it and
    that it authenticates this repository's config. Works when the repository's own key files
    are lost: the exported one is all it needs."""
    config = read_config(backend)
    if not config.encrypted:
        raise NotEncrypted(f"the repository at {backend.url} is not encrypted")
    key = parse_key_file(blob, "", where)
    if key.version != 2:
        raise UnknownFormat(f"{where}: a version {key.version} key file cannot be imported")
    if key.repository != config.id:
        raise RepoError(
            f"{where} is a key of repository {key.repository}, not of {backend.url} ({config.id})"
        )
    data_key = key.unwrap(passphrase, config.id, where)
    check_config_mac(key, MetadataKeys(data_key), config.canonical_bytes(), where)
    name = KEYS_PREFIX + key.id
    if not backend.put_if_absent(name, blob):
        raise RepoExists(f"{backend.url}/{name} exists (this key is already in the repository)")
    return {"key": name, "id": key.id, "label": key.label}


def list_keys(repo: Repository) -> list[dict[str, Any]]:
    """Every key object: its parsed facts (unauthenticated), and which one opened ``repo``."""
    _opened(repo)
    current = repo.unlocked.key.name if repo.unlocked and repo.unlocked.key else None
    out = []
    for name in key_names(repo.backend):
        try:
            info = parse_key_file(repo.backend.get(name), name, f"{repo.url}/{name}").info()
        except NotFound:
            continue
        except UnknownFormat as exc:
            info = {"key": name, "error": str(exc)}
        info["current"] = name == current
        out.append(info)
    return out


__all__ = ["add_key", "change_passphrase", "export_key", "import_key", "list_keys"]
