"""The one backend contract every storage backend implements (local directory, S3).

Keys are relative to the repository root, '/'-separated, without empty, '.' or '..' components
(e.g. ``config``, ``chunks/ab/<hex>``, ``backups/<vm>/<vdi>/<time>.index``). Every method is
thread-safe. Errors: :class:`~orchestrator.repo.errors.NotFound` when an object is missing,
:class:`~orchestrator.repo.errors.BackendError` (or a subclass) for anything else; no foreign
exception (OSError, botocore) escapes.

The contract test suite is ``tests/repo/test_backend_contract.py``; a new backend is added to its
parametrization, not given its own suite.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from orchestrator.repo.errors import RepoError

MAX_KEY_LENGTH = 900  # S3 allows 1024 bytes; leave room for a bucket prefix


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str  # relative to the repository root
    size: int  # bytes
    mtime: float  # seconds since the epoch (S3: LastModified)


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ValueError (a caller bug)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid object key {key!r}: empty or not a string")
    if len(key.encode("utf-8")) > MAX_KEY_LENGTH:
        raise ValueError(f"invalid object key {key[:60]!r}...: longer than {MAX_KEY_LENGTH} bytes")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise ValueError(f"invalid object key {key!r}: absolute, backslash or NUL")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' component")
        if part.startswith(".tmp-"):
            raise ValueError(f"invalid object key {key!r}: '.tmp-' names are reserved")
    return key


def check_prefix(prefix: str) -> str:
    """A list prefix: '' (everything) or the start of a key (not necessarily ending in '/')."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str) or prefix.startswith("/") or "\\" in prefix or "\0" in prefix:
        raise ValueError(f"invalid list prefix {prefix!r}")
    for part in prefix.split("/")[:-1]:
        if part in ("", ".", ".."):
            raise ValueError(f"invalid list prefix {prefix!r}: empty, '.' or '..' component")
    return prefix


class Backend(abc.ABC):
    """Object storage for one repository. ``url`` names it in messages (path or s3://...)."""

    url: str

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object. NotFound if it does not exist."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Create or replace atomically: readers see the old object or the new one, never a part."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create only if absent (atomically). True if this call created it, False if it existed.

        After a retried write whose first attempt reached the store but lost its answer, an
        object holding exactly ``data`` also counts as created by this call, so give objects
        that act as locks a unique content (e.g. a random token) to tell writers apart.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True if the object exists."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and mtime of one object. NotFound if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively, in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object. Idempotent: deleting a missing object is not an error."""

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete several objects (idempotent). Backends batch this where they can."""
        for key in keys:
            self.delete(key)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and file handles. The backend is unusable afterwards."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


__all__ = ["Backend", "ObjectInfo", "RepoError", "check_key", "check_prefix", "MAX_KEY_LENGTH"]
