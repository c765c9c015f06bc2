"""A repository: restore points, indexes and chunks on a backend, and the backup writer.

Keys (see DESIGN.md, Formats → Repository)::

    backups/<vm>/<time>.json           restore point: VM metadata; written after all its indexes
    backups/<vm>/<vdi>/<time>.index    one complete index per disk backup (the commit point)
    backups/<vm>/<vdi>/<time>.pending  an index being committed (see "Commit protocol")
    chunks/ab/<digest>                 chunks
    locks/writers/…, locks/gc/…        leases (orchestrator.repo.locks)
    locks/gc-deleted/<run>.list|.done  GC deletion lists (published before GC deletes anything)
    cache/dedup-lookup                 cached cross-VM dedup lookup (written by GC)

``<time>`` is UTC ``YYYYmmddTHHMMSS.ffffffZ``, shared by a session's indexes and its JSON; a
restore point's id is ``<vm>/<time>``; ``latest`` and ``<vm>/latest`` are accepted too.

Writer API (driven by the backup job)::

    with repo.begin_backup(vm_uuid) as session:          # takes a writer lease (heartbeat)
        w = session.disk_writer(vdi, disk_uuid, size, base="backups/…/x.index")
        for i, data in changed_chunks:                    # bounded memory: blocks when full
            w.put_chunk(i, data)
        key = w.commit()                                  # may raise ChunksVanished: re-put
        session.commit({"name": ...})                     # writes <vm>/<time>.json

What the backup job must handle:
- ``disk_writer(base=key)`` raises NotFound if the base restore point was pruned meanwhile: fall
  back to a full backup of that disk.
- ``commit`` raises ChunksVanished with chunk positions to put again; they may include chunks
  that did not change (taken from the base index), so the job must be able to re-read any chunk
  from its source until the disk is committed.
- An incremental whose virtual size differs from its base must put again the chunk(s) whose
  length changed (``writer.must_put``); ``commit`` refuses otherwise.
- Chunks never put are zero in a full backup and the base's in an incremental.

Group durability: on a backend that can stage objects (local directories), new chunks are written
to temporary names without fsync and made durable a batch at a time (``DURABLE_BATCH`` chunks:
parallel fsyncs, renames, one fsync per touched directory; see backends/local.py). A chunk is
counted as stored (and deduplicated against by the session's other disks) once staged, so a
disk's ``commit`` first publishes every chunk the *session* staged and waits for batches being
published by other threads: an index never names a chunk that is not durable under its final
name. A batch that fails fails every later commit of the session.

Commit protocol of one disk index (why it is safe against prune + GC is argued in
:mod:`orchestrator.jobs.gc`): wait until every chunk is durable; write the index as
``.pending`` (GC marks from pending indexes of live writers); read the GC deletion lists and, for
digests of this index that a list names, wait for that GC run to end and check the chunk still
exists; a vanished chunk makes ``commit`` raise :class:`ChunksVanished` (the pending index is
removed, the caller re-puts those chunks and commits again); otherwise write the final
``.index`` and delete the pending one.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from agent import speedups
from orchestrator.repo import locks
from orchestrator.repo.backends import Backend, open_backend
from orchestrator.repo.codec import (
    DIGEST_SIZE,
    FLAG_COMPRESSED,
    FLAG_ENCRYPTED,
    HEADER,
    NONCE_SIZE,
    TAG_SIZE,
    ZERO_DIGEST,
    ChunkCodec,
    chunk_key,
)
from orchestrator.repo.config import RepoConfig, init_repo, load_repo, read_config
from orchestrator.repo.dedup import CACHE_KEY, DigestLookup, KnownDigests, records
from orchestrator.repo.errors import CorruptIndex, NotFound, PassphraseRequired, RepoError
from orchestrator.repo.index import Index

BACKUPS = "backups/"
DELETIONS_PREFIX = "locks/gc-deleted/"
DELETION_MAGIC = b"FPGCDEL1"
RP_FORMAT = "xcp-fastpath-restore-point"
CACHE_REFRESH_AFTER = 64  # a writer that read this many uncached indexes rewrites the cache
DURABLE_BATCH = 32  # staged chunks made durable together (64 MiB of 2 MiB chunks)
_TIME_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")
_UUIDISH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ChunksVanished(RepoError):
    """Chunks this index relied on were deleted by a concurrent GC; re-put them and commit again.

    ``positions`` are the chunk numbers (of this disk) whose data must be put again.
    """

    def __init__(self, message: str, positions: list[int]):
        super().__init__(message)
        self.positions = positions


class RestorePointNotFound(NotFound):
    pass


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


# -- time and keys -----------------------------------------------------------------------------


def format_time(epoch: float) -> str:
    seconds = int(epoch)
    micros = int(round((epoch - seconds) * 1e6))
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def parse_time(text: str) -> float:
    if not _TIME_RE.match(text):
        raise ValueError(f"not a restore point time: {text!r}")
    base = calendar.timegm(time.strptime(text[:15], "%Y%m%dT%H%M%S"))
    return base + int(text[16:22]) / 1e6


def check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _UUIDISH.match(value):
        raise ValueError(f"invalid {what} {value!r}")
    return value


def index_key(vm: str, vdi: str, when: str) -> str:
    return f"{BACKUPS}{vm}/{vdi}/{when}.index"


def pending_key(vm: str, vdi: str, when: str) -> str:
    return f"{BACKUPS}{vm}/{vdi}/{when}.pending"


def rp_key(vm: str, when: str) -> str:
    return f"{BACKUPS}{vm}/{when}.json"


@dataclass
class RestorePoint:
    vm: str
    time: str
    json_key: str | None = None  # None: incomplete (indexes without their JSON)
    disks: dict[str, str] = field(default_factory=dict)  # vdi -> index key

    @property
    def id(self) -> str:
        return f"{self.vm}/{self.time}"

    @property
    def complete(self) -> bool:
        return self.json_key is not None

    @property
    def timestamp(self) -> float:
        return parse_time(self.time)

    def keys(self) -> list[str]:
        """Every object of this restore point (JSON first: deleting it first hides the point)."""
        out = [self.json_key] if self.json_key else []
        return out + sorted(self.disks.values())


@dataclass
class Catalog:
    """One listing of ``backups/``."""

    points: dict[tuple[str, str], RestorePoint] = field(default_factory=dict)
    indexes: list[str] = field(default_factory=list)  # final index keys
    pending: list[tuple[str, str, str]] = field(default_factory=list)  # (key, vm, time)
    other: list[str] = field(default_factory=list)  # keys we do not recognise

    def restore_points(self, vm: str | None = None, complete: bool | None = None):
        out = [
            p
            for p in self.points.values()
            if (vm is None or p.vm == vm) and (complete is None or p.complete == complete)
        ]
        out.sort(key=lambda p: (p.vm, p.time))
        return out


def scan_backups(backend: Backend) -> Catalog:
    cat = Catalog()
    for info in backend.list(BACKUPS):
        parts = info.key[len(BACKUPS) :].split("/")
        if len(parts) == 2 and parts[1].endswith(".json") and _TIME_RE.match(parts[1][:-5]):
            vm, when = parts[0], parts[1][:-5]
            point = cat.points.setdefault((vm, when), RestorePoint(vm, when))
            point.json_key = info.key
        elif len(parts) == 3 and parts[2].endswith(".index") and _TIME_RE.match(parts[2][:-6]):
            vm, vdi, when = parts[0], parts[1], parts[2][:-6]
            point = cat.points.setdefault((vm, when), RestorePoint(vm, when))
            point.disks[vdi] = info.key
            cat.indexes.append(info.key)
        elif len(parts) == 3 and parts[2].endswith(".pending") and _TIME_RE.match(parts[2][:-8]):
            cat.pending.append((info.key, parts[0], parts[2][:-8]))
        else:
            cat.other.append(info.key)
    cat.indexes.sort()
    return cat


def fetch_many(
    backend: Backend, keys: list[str], concurrency: int = 16
) -> Iterator[tuple[str, bytes | None]]:
    """GET many small objects (indexes) with at most ``concurrency`` requests in flight, in
    completion order; ``None`` for an object that vanished (pruned meanwhile). On S3 a GET costs
    a round trip, so reading thousands of indexes one by one would be latency-bound."""

    def one(key: str) -> tuple[str, bytes | None]:
        try:
            return key, backend.get(key)
        except NotFound:
            return key, None

    if concurrency <= 1 or len(keys) <= 1:
        for key in keys:
            yield one(key)
        return
    with ThreadPoolExecutor(concurrency, thread_name_prefix="fetch") as pool:
        todo = iter(keys)
        running = set()
        for key in todo:
            running.add(pool.submit(one, key))
            if len(running) >= 2 * concurrency:
                break
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
                nxt = next(todo, None)
                if nxt is not None:
                    running.add(pool.submit(one, nxt))


# -- GC deletion lists (shared by the writer's commit check and GC) ---------------------------


def encode_deletion_list(meta: dict[str, Any], digests: np.ndarray) -> bytes:
    header = json.dumps(meta, sort_keys=True).encode()
    return b"".join(
        (
            DELETION_MAGIC,
            len(header).to_bytes(4, "big"),
            header,
            np.ascontiguousarray(digests).tobytes(),
        )
    )


def decode_deletion_list(data: bytes, name: str) -> tuple[dict[str, Any], np.ndarray]:
    if data[:8] != DELETION_MAGIC or len(data) < 12:
        raise RepoError(f"{name}: not a GC deletion list")
    hlen = int.from_bytes(data[8:12], "big")
    start = 12 + hlen
    if len(data) < start or (len(data) - start) % DIGEST_SIZE:
        raise RepoError(f"{name}: truncated GC deletion list")
    try:
        meta = json.loads(data[12:start])
    except ValueError:
        raise RepoError(f"{name}: bad GC deletion list header") from None
    return meta, np.frombuffer(data, dtype=f"V{DIGEST_SIZE}", offset=start)


# -- stats -----------------------------------------------------------------------------------


@dataclass
class WriterStats:
    logical_bytes: int = 0  # bytes given to put_chunk
    chunks_new: int = 0
    chunks_deduped: int = 0  # already in the base, this session, or the repository
    chunks_deduped_repo: int = 0  # of which found through the repository-wide lookup
    chunks_zero: int = 0
    new_plain_bytes: int = 0  # plaintext bytes of new chunks
    bytes_written: int = 0  # object bytes stored (after compression/encryption)
    compressed_chunks: int = 0
    compressed_bytes: int = 0  # payload bytes of new chunks after compression (no crypto overhead)

    def add(self, other: WriterStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_json(self) -> dict[str, int]:
        return asdict(self)


# -- repository --------------------------------------------------------------------------------


class Repository:
    """An open repository. Thread-safe for reads; writers are per session."""

    def __init__(self, backend: Backend, config: RepoConfig, codec: ChunkCodec):
        self.backend = backend
        self.config = config
        self.codec = codec
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
        **backend_options: Any,
    ) -> Repository:
        """Open a repository. ``need_key=False``: an encrypted one opens without its data key
        when no passphrase is given (metadata only: list, prune, GC, check; reading or writing
        a chunk then raises PassphraseRequired)."""
        backend = (
            url
            if isinstance(url, Backend)
            else open_backend(url, concurrency=concurrency, **backend_options)
        )
        try:
            config = read_config(backend)
            if config.encrypted and passphrase is None and not need_key:
                return cls(backend, config, MissingKeyCodec(backend.url))
            config, codec = load_repo(backend, passphrase)
        except BaseException:
            if not isinstance(url, Backend):
                backend.close()
            raise
        return cls(backend, config, codec)

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
        config, codec = load_repo(backend, passphrase)
        return cls(backend, config, codec)

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
        cat = catalog or self.scan()
        points = cat.restore_points(complete=True)
        if ident == "latest":
            if not points:
                raise RestorePointNotFound(f"{self.url}: no restore point")
            return max(points, key=lambda p: (p.time, p.vm))
        vm, _, when = ident.rpartition("/")
        if not vm:
            raise RestorePointNotFound(
                f"{self.url}: bad restore point id {ident!r} (use <vm>/<time> or latest)"
            )
        if when == "latest":
            mine = [p for p in points if p.vm == vm]
            if not mine:
                raise RestorePointNotFound(f"{self.url}: no restore point for VM {vm}")
            return mine[-1]
        point = cat.points.get((vm, when))
        if point is None or not point.complete:
            raise RestorePointNotFound(f"{self.url}: no restore point {ident}")
        return point

    def read_metadata(self, point: RestorePoint) -> dict[str, Any]:
        if point.json_key is None:
            return {}
        data = self.backend.get(point.json_key)
        try:
            doc = json.loads(data)
        except ValueError:
            raise RepoError(f"{self.url}/{point.json_key}: not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != RP_FORMAT:
            raise RepoError(f"{self.url}/{point.json_key}: not a restore point document")
        return doc

    def read_index(self, key: str) -> Index:
        return Index.decode(self.backend.get(key), f"{self.url}/{key}")

    def read_chunk(self, digest: bytes, length: int | None = None) -> bytes:
        """A chunk's plaintext (zeros for ZERO_DIGEST, ``length`` bytes or a full chunk)."""
        if digest == ZERO_DIGEST:
            return bytes(self.config.chunk_size if length is None else length)
        key = chunk_key(digest)
        data = self.codec.decode(self.backend.get(key), digest)
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
                            decoded.append((key, Index.decode(data, key).entries))
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
    ) -> BackupSession:
        """Start a backup session of one VM (takes a writer lease, then loads the lookup)."""
        check_name("VM uuid", vm_uuid)
        if isinstance(self.codec, MissingKeyCodec):
            self.codec.encode  # noqa: B018 - raises PassphraseRequired, before any lease
        when = format_time(time.time())
        lease = locks.acquire_writer_lease(
            self.backend, f"{vm_uuid}.{when}", ttl=lease_ttl, info={"vm": vm_uuid, "time": when}
        )
        try:
            # Order matters: the lease exists before anything (lookup, base) is read.
            lookup = self.dedup_lookup() if use_lookup else DigestLookup()
        except BaseException:
            lease.release()
            raise
        return BackupSession(self, vm_uuid, when, lease, lookup, gc_wait=gc_wait)


class BackupSession:
    """One VM backup: disk writers sharing a writer lease; ``commit`` writes the VM JSON."""

    def __init__(
        self,
        repo: Repository,
        vm: str,
        when: str,
        lease: locks.Lease,
        lookup: DigestLookup,
        *,
        gc_wait: float | None = None,
    ):
        self.repo = repo
        self.vm = vm
        self.time = when
        self.lease = lease
        self.lookup = lookup
        self.gc_wait = gc_wait
        self.writers: list[DiskWriter] = []
        self.written: set[bytes] = set()  # chunks this session stored or confirmed
        self.inflight: dict[bytes, threading.Event] = {}  # chunks being stored right now
        self.lock = threading.Lock()
        self.committed_id: str | None = None
        self._closed = False
        # group durability (backends with stage/publish): chunks staged, not yet durable
        self.durable_batch = DURABLE_BATCH
        # a method of the backend's class (a wrapper forwarding unknown attributes, like the
        # tests' counting or fault-injecting backends, keeps plain puts: they see every put)
        self._group = all(
            callable(getattr(type(repo.backend), name, None))
            for name in ("stage", "publish", "discard")
        )
        self._staged: list[Any] = []
        self._publishing = 0
        self._durable_error: BaseException | None = None
        self._durable_cond = threading.Condition(threading.Lock())

    @property
    def id(self) -> str:
        return f"{self.vm}/{self.time}"

    def disk_writer(
        self,
        vdi_uuid: str,
        disk_uuid: str,
        virtual_size: int,
        *,
        base: str | Index | None = None,
        concurrency: int = 8,
        max_in_flight: int | None = None,
    ) -> DiskWriter:
        check_name("VDI uuid", vdi_uuid)
        if any(w.vdi == vdi_uuid for w in self.writers):
            raise ValueError(f"VDI {vdi_uuid} already has a writer in this session")
        base_key = None
        if isinstance(base, str):
            base_key = base
            base_index = self.repo.read_index(base)
        else:
            base_index = base
        w = DiskWriter(
            self,
            vdi_uuid,
            disk_uuid,
            virtual_size,
            base_index,
            base_key,
            concurrency=concurrency,
            max_in_flight=max_in_flight,
        )
        self.writers.append(w)
        return w

    # -- group durability --------------------------------------------------------------------

    def put_chunk_object(self, key: str, obj: bytes) -> None:
        """Store one chunk object: staged (then published in batches) where the backend can,
        else a plain durable ``put``."""
        backend = self.repo.backend
        if not self._group:
            backend.put(key, obj)
            return
        staged = backend.stage(key, obj)
        with self._durable_cond:
            if self._durable_error is not None:
                backend.discard([staged])
                raise self._durable_error
            self._staged.append(staged)
            if len(self._staged) < self.durable_batch:
                return
            batch, self._staged = self._staged, []
            self._publishing += 1
        self._publish(batch)

    def _publish(self, batch: list[Any]) -> None:
        try:
            self.repo.backend.publish(batch)
        except BaseException as exc:
            with self._durable_cond:
                if self._durable_error is None:
                    self._durable_error = exc
            raise
        finally:
            with self._durable_cond:
                self._publishing -= 1
                self._durable_cond.notify_all()

    def flush_durable(self) -> None:
        """Publish every staged chunk and wait for batches other threads are publishing;
        raise the error of any batch that failed. After this, every chunk stored so far by any
        disk of the session is durable under its final name."""
        if not self._group:
            return
        with self._durable_cond:
            batch, self._staged = self._staged, []
            if batch:
                self._publishing += 1
        if batch:
            self._publish(batch)
        with self._durable_cond:
            while self._publishing:
                self._durable_cond.wait()
            if self._durable_error is not None:
                raise self._durable_error

    def _discard_staged(self) -> None:
        if not self._group:
            return
        with self._durable_cond:
            batch, self._staged = self._staged, []
        if batch:
            self.repo.backend.discard(batch)

    def stats(self) -> WriterStats:
        total = WriterStats()
        for w in self.writers:
            total.add(w.stats)
        return total

    def commit(self, metadata: dict[str, Any] | None = None) -> str:
        """Write ``backups/<vm>/<time>.json`` after every disk index; release the lease."""
        if self._closed:
            raise RepoError(f"backup session {self.id} is closed")
        pending = [w.vdi for w in self.writers if w.committed_key is None]
        if pending:
            raise RepoError(f"backup session {self.id}: disks not committed: {', '.join(pending)}")
        self.lease.check()
        doc = {
            "format": RP_FORMAT,
            "version": 1,
            "id": self.id,
            "vm": self.vm,
            "time": self.time,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "disks": [
                {
                    "vdi": w.vdi,
                    "disk_uuid": w.index.disk_uuid,
                    "index": w.committed_key,
                    "virtual_size": w.index.virtual_size,
                    "base": w.index.base,
                    "stats": w.stats.to_json(),
                }
                for w in self.writers
            ],
            "stats": self.stats().to_json(),
            "metadata": metadata or {},
        }
        self.repo.backend.put(
            rp_key(self.vm, self.time), json.dumps(doc, indent=1, sort_keys=True).encode()
        )
        self.committed_id = self.id
        self._close()
        return self.id

    def abort(self) -> None:
        """Give up: remove this session's indexes (it has no JSON yet) and release the lease."""
        if self._closed:
            return
        keys = []
        for w in self.writers:
            w.abort()
            keys.append(pending_key(self.vm, w.vdi, self.time))
            if w.committed_key:
                keys.append(w.committed_key)
        try:
            self.repo.backend.delete_many(keys)
        except RepoError:
            pass
        self._close()

    def _close(self) -> None:
        self._closed = True
        for w in self.writers:
            w.shutdown()
        self._discard_staged()  # an aborted session's chunks that never became durable
        self.lease.release()

    def __enter__(self) -> BackupSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.committed_id is None:
            self.abort()

    # -- commit check against concurrent GC --------------------------------------------------

    def vanished_digests(self, index: Index) -> set[bytes]:
        """Digests of ``index`` deleted (or being deleted) by a GC run. See jobs/gc.py."""
        backend = self.repo.backend
        entries = {i.key: i for i in backend.list(DELETIONS_PREFIX)}
        lists = []
        for key, info in entries.items():
            if not key.endswith(".list"):
                continue
            done = entries.get(key[: -len(".list")] + ".done")
            if done is not None and done.mtime < self.lease.started:
                # that run had finished deleting before this session took its lease, so before
                # it read anything: every index it read was validated against that run
                continue
            lists.append(info)
        if not lists:
            return set()
        ours = np.unique(records(index.entries))
        gone: set[bytes] = set()
        for info in lists:
            try:
                meta, digests = decode_deletion_list(backend.get(info.key), info.key)
            except NotFound:
                continue  # cleaned up: that run ended long before this session started
            common = np.intersect1d(ours, digests)
            if not len(common):
                continue
            self._wait_for_gc_run(info.key, meta)
            for rec in common:
                digest = rec.tobytes()
                if not backend.exists(chunk_key(digest)):
                    gone.add(digest)
        return gone

    def _wait_for_gc_run(self, list_key: str, meta: dict[str, Any]) -> None:
        """Wait until the GC run that published ``list_key`` can no longer delete anything."""
        backend = self.repo.backend
        done_key = list_key[: -len(".list")] + ".done"
        lease_key = str(meta.get("lease", ""))
        token = meta.get("token")
        # By default wait as long as the run holds its lease (it is making progress: a sweep of
        # millions of chunks takes minutes); ``gc_wait`` bounds it for callers that prefer to fail.
        limit = float("inf") if self.gc_wait is None else self.gc_wait
        deadline = time.monotonic() + limit
        delay = 0.05
        while True:
            if backend.exists(done_key):
                return
            held = locks.read_lease(backend, lease_key) if lease_key else None
            if held is None or held.token != token or held.expired():
                return  # that run is dead or finished: it deletes nothing more
            if time.monotonic() > deadline:
                raise RepoError(
                    f"backup {self.id}: GC run {list_key} still running after {limit:.0f} s"
                )
            self.lease.refresh()
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


class DiskWriter:
    """Writes one disk's chunks and index. ``put_chunk`` from one thread; stores in a pool."""

    def __init__(
        self,
        session: BackupSession,
        vdi: str,
        disk_uuid: str,
        virtual_size: int,
        base: Index | None,
        base_key: str | None,
        *,
        concurrency: int = 8,
        max_in_flight: int | None = None,
    ):
        self.session = session
        self.repo = session.repo
        self.vdi = vdi
        cs = self.repo.config.chunk_size
        if base is not None:
            if base.chunk_size != cs:
                raise RepoError(f"base index {base_key}: chunk size {base.chunk_size} != {cs}")
            self.index = base.derive(base=base_key, virtual_size=virtual_size)
            self.index.disk_uuid = Index(disk_uuid, 0).disk_uuid
            self.known = KnownDigests(self.index.entries)
            # A resize changes the length of the chunk that was, or becomes, the partial last
            # one: its base entry no longer fits, so the caller must put it again.
            self.must_put: set[int] = set()
            if base.virtual_size != virtual_size:
                for size in (base.virtual_size, virtual_size):
                    i = size // cs
                    if size % cs and i < len(self.index) and self.index.get(i) != ZERO_DIGEST:
                        self.must_put.add(i)  # a zero entry fits any length
        else:
            self.index = Index(disk_uuid, virtual_size, cs, None)
            self.known = KnownDigests()
            self.must_put = set()
        self.stats = WriterStats()
        self.committed_key: str | None = None
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix=f"put {vdi[:8]}")
        self._slots = threading.BoundedSemaphore(max_in_flight or 2 * max(1, concurrency))
        self._lock = threading.Lock()
        self._futures: set[Future] = set()
        self._error: BaseException | None = None
        self._vanished: set[bytes] = set()

    def chunk_length(self, i: int) -> int:
        cs = self.index.chunk_size
        if not 0 <= i < len(self.index):
            raise IndexError(f"chunk {i} out of range (disk has {len(self.index)} chunks)")
        return min(cs, self.index.virtual_size - i * cs)

    def put_chunk(self, i: int, data: bytes | bytearray | memoryview) -> None:
        """Store chunk ``i`` (exactly its length; the last one may be short). Blocks while
        the bounded number of chunks in flight is reached; raises a previous store's error."""
        if self.committed_key is not None:
            raise RepoError(f"disk {self.vdi}: already committed")
        expected = self.chunk_length(i)
        if len(data) != expected:
            raise ValueError(
                f"chunk {i} of disk {self.vdi}: {len(data)} bytes, expected {expected}"
            )
        self._raise_error()
        self.must_put.discard(i)
        self._slots.acquire()
        try:
            self._raise_error()
            fut = self._pool.submit(self._store, i, bytes(data))
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._futures.discard(fut)
            exc = fut.exception()
            if exc is not None and self._error is None:
                self._error = exc
        self._slots.release()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _known(self, digest: bytes) -> bool:
        if digest in self._vanished:
            return False
        if digest in self.known:
            return True
        with self.session.lock:
            return digest in self.session.written

    def _wait_inflight(self, digest: bytes) -> bool:
        """If another thread of the session is storing ``digest``, wait for it and return True
        when it succeeded; otherwise claim the digest (return False: the caller stores it)."""
        while True:
            with self.session.lock:
                if digest in self.session.written and digest not in self._vanished:
                    return True
                event = self.session.inflight.get(digest)
                if event is None:
                    self.session.inflight[digest] = threading.Event()
                    return False
            event.wait()

    def _store(self, i: int, data: bytes) -> None:
        codec = self.repo.codec
        backend = self.repo.backend
        stats = WriterStats(logical_bytes=len(data))
        if speedups.is_zero(data):
            digest = ZERO_DIGEST
            stats.chunks_zero = 1
        else:
            digest = codec.digest(data)
            if self._known(digest) or self._wait_inflight(digest):
                stats.chunks_deduped = 1
            else:
                try:
                    if (
                        digest not in self._vanished
                        and self.session.lookup.may_contain(digest)
                        and backend.exists(chunk_key(digest))
                    ):
                        stats.chunks_deduped = 1
                        stats.chunks_deduped_repo = 1
                    else:
                        obj = codec.encode(data, digest)
                        self.session.put_chunk_object(chunk_key(digest), obj)
                        stats.chunks_new = 1
                        stats.new_plain_bytes = len(data)
                        stats.bytes_written = len(obj)
                        flags, payload = HEADER.unpack_from(obj)[2], HEADER.unpack_from(obj)[5]
                        if flags & FLAG_COMPRESSED:
                            stats.compressed_chunks = 1
                        if flags & FLAG_ENCRYPTED:
                            payload -= NONCE_SIZE + TAG_SIZE
                        stats.compressed_bytes = payload
                        self._vanished.discard(digest)
                    with self.session.lock:
                        self.session.written.add(digest)
                finally:
                    with self.session.lock:
                        self.session.inflight.pop(digest).set()
        with self._lock:
            self.index.set(i, digest)
            self.stats.add(stats)

    def wait(self) -> None:
        """Wait until every chunk put so far is durable; raise the first store error."""
        while True:
            with self._lock:
                pending = list(self._futures)
            if not pending:
                break
            for fut in pending:
                fut.exception()
        self._raise_error()
        self.session.flush_durable()

    def commit(self) -> str:
        """Make the disk's index the commit point; returns its key. See the module docstring."""
        if self.committed_key is not None:
            return self.committed_key
        if self.must_put:
            raise RepoError(
                f"disk {self.vdi}: resized from its base; put chunk(s) {sorted(self.must_put)} "
                f"again (their length changed)"
            )
        self.wait()
        session = self.session
        backend = self.repo.backend
        session.lease.refresh()
        session.lease.check()
        data = self.index.encode()
        pkey = pending_key(session.vm, self.vdi, session.time)
        backend.put(pkey, data)
        try:
            gone = session.vanished_digests(self.index)
        except BaseException:
            backend.delete(pkey)
            raise
        if gone:
            backend.delete(pkey)
            self._vanished |= gone
            with session.lock:
                session.written.difference_update(gone)
            positions = [i for i, d in enumerate(self.index.digests()) if d in gone]
            raise ChunksVanished(
                f"disk {self.vdi}: {len(gone)} chunk(s) deleted by a concurrent GC; "
                f"put chunks {positions[:8]}{'...' if len(positions) > 8 else ''} again",
                positions,
            )
        session.lease.check()
        key = index_key(session.vm, self.vdi, session.time)
        backend.put(key, data)
        backend.delete(pkey)
        self.committed_key = key
        return key

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        self._error = self._error or RepoError(f"disk {self.vdi}: aborted")
        self.shutdown()


__all__ = [
    "BackupSession",
    "Catalog",
    "ChunksVanished",
    "DiskWriter",
    "Repository",
    "RestorePoint",
    "RestorePointNotFound",
    "WriterStats",
    "format_time",
    "index_key",
    "parse_time",
    "pending_key",
    "rp_key",
    "scan_backups",
]
