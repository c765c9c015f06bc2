"""A repository, opened: its config and codec on a backend, reads, and the start of a backup.

:class:`Repository` is the front door: ``Repository.open(url)`` / ``Repository.init(url)``, then
reads (restore points, indexes, chunks, the cross-VM dedup lookup) and ``begin_backup``. What it
stands on lives beside it in ``orchestrator/repo/``:

- ``config.py``: the ``config`` object and ``keys/`` (data key wrapped under the passphrase);
- ``codec.py``: chunk objects (digest, zstd, AES-GCM) and their keys ``chunks/ab/<digest>``;
- ``catalog.py``: ``backups/``: restore points, index keys, times, listing (:class:`Catalog`);
- ``index.py``: one disk's index; ``dedup.py``: the dedup lookup and its cache;
- ``writer.py``: backup sessions and disk writers, and the commit protocol of an index;
  ``durable.py`` (group durability of new chunks), ``deletions.py`` (GC deletion lists and the
  writers' check against them);
- ``locks.py``: leases; ``backends/``: local directory and S3; ``retry.py``: the S3 retry policy.

An encrypted repository opened without its passphrase (``need_key=False``) holds a
:class:`MissingKeyCodec`: metadata work (list, prune, GC, check) runs, reading or writing a chunk
raises PassphraseRequired.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from orchestrator.repo import locks
from orchestrator.repo.backends import Backend, open_backend
from orchestrator.repo.catalog import (
    Catalog,
    RestorePoint,
    check_name,
    decode_point_document,
    encode_point_document,
    fetch_many,
    format_time,
    index_binding,
    named_disks,
    parse_index_key,
    parse_time,
    scan_backups,
)
from orchestrator.repo.codec import ZERO_DIGEST, ChunkCodec, chunk_key
from orchestrator.repo.config import RepoConfig, Unlocked, init_repo, unlock_repo
from orchestrator.repo.damage import damaged_digests
from orchestrator.repo.dedup import CACHE_KEY, DigestLookup
from orchestrator.repo.errors import (
    CorruptChunk,
    CorruptIndex,
    IndexTampered,
    NotFound,
    PassphraseRequired,
    RepoError,
    Tampered,
)
from orchestrator.repo.index import UNVERIFIED, Index, IndexAuth
from orchestrator.repo.writer import BackupSession

CACHE_REFRESH_AFTER = 64  # a writer that read this many uncached indexes rewrites the cache


class MissingKeyCodec:
    """Stands for the codec of an encrypted repository opened without its passphrase."""

    encrypted = True

    def __init__(self, url: str):
        self.url = url

    def __getattr__(self, name: str):
        raise PassphraseRequired(
            f"the repository at {self.url} is encrypted: this needs its passphrase "
            f"(FASTPATH_PASSPHRASE or --passphrase-file)"
        )


class Repository:
    """An open repository. Thread-safe for reads; writers are per session."""

    def __init__(
        self,
        backend: Backend,
        config: RepoConfig,
        codec: ChunkCodec | MissingKeyCodec,
        unlocked: Unlocked | None = None,
    ):
        self.backend = backend
        self.config = config
        self.codec = codec
        # MetadataKeys of an authenticated (version 2) encrypted repository opened with its key
        self.keys = unlocked.keys if unlocked is not None else None
        self.legacy = bool(unlocked and unlocked.legacy)  # version 1 encrypted: read only
        self.unlocked = unlocked
        self._lookup: DigestLookup | None = None
        self._lookup_lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.backend.url

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str] | Backend,
        *,
        passphrase: str | None = None,
        concurrency: int = 16,
        need_key: bool = True,
        allow_legacy_v1: bool | None = None,
        **backend_options: Any,
    ) -> Repository:
        """Open a repository. ``need_key=False``: an encrypted one opens without its data key
        when no passphrase is given (metadata only: list, prune, GC, check; reading or writing
        a chunk then raises PassphraseRequired). ``allow_legacy_v1``: open an encrypted
        repository of format version 1 (default: ``FASTPATH_ALLOW_LEGACY_V1=1``)."""
        backend = (
            url
            if isinstance(url, Backend)
            else open_backend(url, concurrency=concurrency, **backend_options)
        )
        try:
            unlocked = unlock_repo(
                backend, passphrase, need_key=need_key, allow_legacy_v1=allow_legacy_v1
            )
        except BaseException:
            if not isinstance(url, Backend):
                backend.close()
            raise
        if unlocked.codec is None:
            return cls(backend, unlocked.config, MissingKeyCodec(backend.url), unlocked)
        return cls(backend, unlocked.config, unlocked.codec, unlocked)

    @classmethod
    def init(
        cls,
        url: str | os.PathLike[str] | Backend,
        *,
        encrypt: bool = False,
        passphrase: str | None = None,
        compression: str = "zstd:1",
        concurrency: int = 16,
        **backend_options: Any,
    ) -> Repository:
        backend = (
            url
            if isinstance(url, Backend)
            else open_backend(url, concurrency=concurrency, **backend_options)
        )
        init_repo(backend, encrypt=encrypt, passphrase=passphrase, compression=compression)
        unlocked = unlock_repo(backend, passphrase)
        assert unlocked.codec is not None
        return cls(backend, unlocked.config, unlocked.codec, unlocked)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalogue -----------------------------------------------------------------------------

    def scan(self) -> Catalog:
        return scan_backups(self.backend)

    def list_restore_points(self, vm: str | None = None, *, include_incomplete: bool = False):
        return self.scan().restore_points(vm, None if include_incomplete else True)

    def resolve(self, ident: str, catalog: Catalog | None = None) -> RestorePoint:
        """``<vm>/<time>``, ``<vm>/latest`` or ``latest`` (the newest restore point of all)."""
        return (catalog or self.scan()).resolve(ident, self.url)

    # -- metadata: restore point documents and indexes (authenticated when encrypted) --------

    def read_metadata(self, point: RestorePoint) -> dict[str, Any]:
        """The restore point's document (opened and authenticated in an encrypted repository;
        PassphraseRequired there without the key, Tampered if it fails)."""
        if point.json_key is None:
            return {}
        data = self.backend.get(point.json_key)
        return self.decode_point(point, data)

    def decode_point(self, point: RestorePoint, data: bytes) -> dict[str, Any]:
        return decode_point_document(
            data,
            f"{self.url}/{point.json_key}",
            vm=point.vm,
            when=point.time,
            keys=self.keys,
            need_auth=self.keys is not None,
        )

    def encode_point(self, doc: dict[str, Any]) -> bytes:
        if self.legacy or isinstance(self.codec, MissingKeyCodec):
            raise RepoError(
                f"{self.url}: cannot write a restore point here"
            )  # begin_backup says why
        return encode_point_document(doc, self.keys)

    def index_auth(self, key: str) -> IndexAuth | str | None:
        """How the index stored under ``key`` is checked: keyed and bound to ``key``'s VM,
        VDI and time (authenticated encrypted repository), UNVERIFIED (encrypted, no key),
        or plain checksums (unencrypted, or a version 1 encrypted repository)."""
        if self.keys is not None:
            try:
                vm, vdi, when = parse_index_key(key)
            except ValueError:
                raise IndexTampered(f"{self.url}/{key}: not stored under an index key") from None
            return IndexAuth(self.keys.index_key, index_binding(vm, vdi, when))
        if isinstance(self.codec, MissingKeyCodec):
            return UNVERIFIED
        return None

    def decode_index(self, key: str, data: bytes) -> Index:
        return Index.decode(data, f"{self.url}/{key}", self.index_auth(key))

    def encode_index(self, index: Index, key: str) -> bytes:
        """The bytes of ``index`` to store under ``key`` (sets ``index.mac``)."""
        auth = self.index_auth(key)
        return index.encode(auth if isinstance(auth, IndexAuth) else None)

    def read_index(self, key: str) -> Index:
        return self.decode_index(key, self.backend.get(key))

    def point_disks(self, point: RestorePoint, doc: dict[str, Any]) -> dict[str, str]:
        """vdi -> index key of a restore point. In an authenticated repository the stored
        indexes must be exactly those its document names (none removed, none added)."""
        listed = dict(sorted(point.disks.items()))
        if self.keys is None:
            return listed
        where = f"{self.url}/{point.json_key}"
        named = named_disks(doc, where)
        if set(named) != set(listed) or any(named[v].get("index") != k for v, k in listed.items()):
            gone, extra = sorted(set(named) - set(listed)), sorted(set(listed) - set(named))
            raise Tampered(
                f"{where}: an index was removed or added (document names {len(named)} disk(s), "
                f"{len(listed)} stored; missing {gone or '-'}, unexpected {extra or '-'})"
            )
        return listed

    def read_point_index(self, point: RestorePoint, doc: dict[str, Any], vdi: str) -> Index:
        """The index of disk ``vdi`` of ``point`` (``doc``: its document), checked against the
        document in an authenticated repository (the index it was committed with)."""
        key = self.point_disks(point, doc)[vdi]
        index = self.read_index(key)
        if self.keys is not None:
            mac = named_disks(doc, key)[vdi].get("index_mac")
            if not isinstance(mac, str) or mac != (index.mac or b"").hex():
                raise IndexTampered(
                    f"{self.url}/{key}: not the index restore point {point.id} was committed "
                    f"with (replaced)"
                )
        return index

    def read_chunk_object(self, digest: bytes) -> tuple[bytes, bytes]:
        """A chunk's stored object and its checked plaintext. A chunk that fails its check is
        read once more before CorruptChunk is raised: a fault on the wire is not damage."""
        key = chunk_key(digest)
        obj = self.backend.get(key)
        try:
            return obj, self.codec.decode(obj, digest)
        except CorruptChunk:
            obj = self.backend.get(key)
            return obj, self.codec.decode(obj, digest)

    def read_chunk(self, digest: bytes, length: int | None = None) -> bytes:
        """A chunk's plaintext (zeros for ZERO_DIGEST, ``length`` bytes or a full chunk)."""
        if digest == ZERO_DIGEST:
            return bytes(self.config.chunk_size if length is None else length)
        key = chunk_key(digest)
        data = self.read_chunk_object(digest)[1]
        if length is not None and len(data) != length:
            raise RepoError(f"{self.url}/{key}: {len(data)} bytes where {length} were expected")
        return data

    def iter_disk(self, index: Index) -> Iterator[bytes]:
        """The disk's bytes, chunk by chunk (a simple restore, used by tests and tools)."""
        cs = index.chunk_size
        for i in range(len(index)):
            length = min(cs, index.virtual_size - i * cs)
            yield self.read_chunk(index.get(i), length)

    # -- dedup lookup --------------------------------------------------------------------------

    def dedup_lookup(self, *, refresh: bool = True, catalog: Catalog | None = None):
        """The cross-VM lookup: cached copy (if any) plus the indexes committed since."""
        with self._lookup_lock:
            if self._lookup is None:
                try:
                    self._lookup = DigestLookup.decode(self.backend.get(CACHE_KEY))
                except (NotFound, RepoError):
                    self._lookup = DigestLookup()
            if refresh:
                cat = catalog or self.scan()
                todo = [k for k in cat.indexes if k not in self._lookup.index_keys]
                parts = [(k, d) for k, d in fetch_many(self.backend, todo) if d is not None]
                if parts:
                    decoded = []
                    for key, data in parts:
                        try:
                            decoded.append((key, self.decode_index(key, data).entries))
                        except CorruptIndex:
                            continue  # verify reports it; never dedup against it
                    self._lookup.add_many(decoded)
                if len(parts) >= CACHE_REFRESH_AFTER:
                    # save the next writer (another process) from reading them all again; a
                    # stale or racing cache is harmless (hits are confirmed, GC rewrites it)
                    try:
                        self.backend.put(CACHE_KEY, self._lookup.encode())
                    except RepoError:
                        pass
            return self._lookup

    # -- writing -------------------------------------------------------------------------------

    def begin_backup(
        self,
        vm_uuid: str,
        *,
        lease_ttl: float = locks.DEFAULT_TTL,
        use_lookup: bool = True,
        gc_wait: float | None = None,
        when: str | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> BackupSession:
        """Start a backup session of one VM (takes a writer lease, then loads the lookup and
        the damage marks). ``when``: the restore point's time (``fastpath copy`` keeps the
        source's), default now; ``on_wait``: gets a line while a commit waits for a GC run."""
        check_name("VM uuid", vm_uuid)
        if isinstance(self.codec, MissingKeyCodec):
            self.codec.encode  # noqa: B018 - raises PassphraseRequired, before any lease
        if self.legacy:
            raise RepoError(
                f"{self.url} is an encrypted repository of format version 1 (its indexes and "
                f"restore points are not authenticated): it is read only; copy it into a new "
                f"one (fastpath repo init --encrypt NEW; fastpath copy {self.url} NEW)"
            )
        if when is None:
            when = format_time(time.time())
        else:
            parse_time(when)
        lease = locks.acquire_writer_lease(
            self.backend, f"{vm_uuid}.{when}", ttl=lease_ttl, info={"vm": vm_uuid, "time": when}
        )
        try:
            # Order matters: the lease exists before anything (lookup, base) is read.
            lookup = self.dedup_lookup() if use_lookup else DigestLookup()
            damaged = damaged_digests(self.backend)
        except BaseException:
            lease.release()
            raise
        return BackupSession(
            self, vm_uuid, when, lease, lookup, gc_wait=gc_wait, damaged=damaged, on_wait=on_wait
        )
