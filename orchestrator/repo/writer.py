"""The backup writer: a session per VM backup, a disk writer per disk, and their commit protocol.

Writer API (driven by the backup job; ``Repository.begin_backup`` opens the session)::

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

New chunks go through the session's :class:`~orchestrator.repo.durable.DurableBatches` (group
durability where the backend can stage): a disk's ``commit`` first makes every chunk the
*session* staged durable, and a batch that fails fails every later commit of the session.

Commit protocol of one disk index (why it is safe against prune + GC is argued in
:mod:`orchestrator.jobs.gc`): wait until every chunk is durable; write the index as
``.pending`` (GC marks from pending indexes of live writers); read the GC deletion lists
(:mod:`orchestrator.repo.deletions`) and, for digests of this index that a list names, wait for
that GC run to end and check the chunk still exists; a vanished chunk makes ``commit`` raise
:class:`ChunksVanished` (the pending index is removed, the caller re-puts those chunks and
commits again); otherwise write the final ``.index`` and delete the pending one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from orchestrator.lazy import speedups
from orchestrator.repo import locks
from orchestrator.repo.backends import Backend
from orchestrator.repo.catalog import (
    RP_FORMAT,
    check_name,
    index_key,
    pending_key,
    rp_key,
)
from orchestrator.repo.codec import (
    FLAG_COMPRESSED,
    FLAG_ENCRYPTED,
    HEADER,
    NONCE_SIZE,
    TAG_SIZE,
    ZERO_DIGEST,
    ChunkCodec,
    chunk_key,
)
from orchestrator.repo.config import RepoConfig
from orchestrator.repo.damage import damage_key
from orchestrator.repo.dedup import DigestLookup, KnownDigests
from orchestrator.repo.deletions import vanished_digests
from orchestrator.repo.durable import DurableBatches
from orchestrator.repo.errors import RepoError
from orchestrator.repo.index import Index


class ChunksVanished(RepoError):
    """Chunks this index relied on were deleted by a concurrent GC; re-put them and commit again.

    ``positions`` are the chunk numbers (of this disk) whose data must be put again.
    """

    def __init__(self, message: str, positions: list[int]):
        super().__init__(message)
        self.positions = positions


class RepositoryView(Protocol):
    """What a session needs of its repository: an :class:`orchestrator.repo.repository.Repository`
    (a protocol, so that this module does not import the module that imports it)."""

    backend: Backend
    config: RepoConfig
    codec: ChunkCodec

    def read_index(self, key: str) -> Index: ...

    def encode_index(self, index: Index, key: str) -> bytes: ...

    def encode_point(self, doc: dict[str, Any]) -> bytes: ...


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


class BackupSession:
    """One VM backup: disk writers sharing a writer lease; ``commit`` writes the VM JSON."""

    def __init__(
        self,
        repo: RepositoryView,
        vm: str,
        when: str,
        lease: locks.Lease,
        lookup: DigestLookup,
        *,
        gc_wait: float | None = None,
        damaged: set[bytes] | None = None,
        on_wait: Callable[[str], None] | None = None,
    ):
        self.repo = repo
        self.vm = vm
        self.time = when
        self.lease = lease
        self.lookup = lookup
        self.gc_wait = gc_wait
        self.on_wait = on_wait  # gets a line while a commit waits for a GC run
        self.writers: list[DiskWriter] = []
        self.written: set[bytes] = set()  # chunks this session stored or confirmed
        self.inflight: dict[bytes, threading.Event] = {}  # chunks being stored right now
        # chunks marked damaged (orchestrator.repo.damage): never deduplicated onto, stored
        # again when produced; ``healed``: those this session stored again, marks to clear
        self.damaged: frozenset[bytes] = frozenset(damaged or ())
        self.healed: set[bytes] = set()
        self.lock = threading.Lock()
        self.committed_id: str | None = None
        self._closed = False
        self.durable = DurableBatches(repo.backend)  # new chunks, made durable in batches

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

    def stats(self) -> WriterStats:
        total = WriterStats()
        for w in self.writers:
            total.add(w.stats)
        return total

    def commit(
        self, metadata: dict[str, Any] | None = None, *, document: dict[str, Any] | None = None
    ) -> str:
        """Write ``backups/<vm>/<time>.json`` after every disk index; release the lease.
        ``document``: more top-level fields of the restore point document (``fastpath copy``
        keeps the source's ``created`` and ``stats`` and adds ``copied_from``); the fields that
        identify the point (format, version, id, vm, time, disks) cannot be replaced."""
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
                    # the header MAC of the committed index: restore and verify check that
                    # the stored index is this one (authenticated repositories)
                    **({"index_mac": w.index.mac.hex()} if w.index.mac else {}),
                }
                for w in self.writers
            ],
            "stats": self.stats().to_json(),
            "metadata": metadata or {},
        }
        for name, value in (document or {}).items():
            if name not in ("format", "version", "id", "vm", "time", "disks"):
                doc[name] = value
        self.repo.backend.put(rp_key(self.vm, self.time), self.repo.encode_point(doc))
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
        self.durable.discard()  # an aborted session's chunks that never became durable
        self.lease.release()

    def __enter__(self) -> BackupSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.committed_id is None:
            self.abort()

    def clear_healed_marks(self) -> None:
        """Remove the damage marks of the chunks this session stored again (once durable)."""
        with self.lock:
            healed, self.healed = self.healed, set()
        if healed:
            self.repo.backend.delete_many(damage_key(d) for d in sorted(healed))

    # -- commit check against concurrent GC --------------------------------------------------

    def vanished_digests(self, index: Index) -> set[bytes]:
        """Digests of ``index`` deleted (or being deleted) by a GC run; see deletions.py."""
        return vanished_digests(
            self.repo.backend,
            index,
            self.lease,
            gc_wait=self.gc_wait,
            who=f"backup {self.id}",
            notify=self.on_wait,
        )


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
        # base entries marked damaged: an incremental should read and put these positions
        # again (an unchanged chunk is otherwise inherited from the base, damage included)
        self.damaged_positions: list[int] = (
            [i for i, d in enumerate(self.index.digests()) if d in session.damaged]
            if base is not None and session.damaged
            else []
        )
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
        if digest in self.session.damaged:  # only a copy this session stored again counts
            with self.session.lock:
                return digest in self.session.written
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
                        and digest not in self.session.damaged
                        and self.session.lookup.may_contain(digest)
                        and backend.exists(chunk_key(digest))
                    ):
                        stats.chunks_deduped = 1
                        stats.chunks_deduped_repo = 1
                    else:
                        obj = codec.encode(data, digest)
                        self.session.durable.put(chunk_key(digest), obj)
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
                        if digest in self.session.damaged and stats.chunks_new:
                            self.session.healed.add(digest)
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
        self.session.durable.flush()
        self.session.clear_healed_marks()

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
        key = index_key(session.vm, self.vdi, session.time)
        data = self.repo.encode_index(self.index, key)
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
        backend.put(key, data)
        backend.delete(pkey)
        self.committed_key = key
        return key

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        self._error = self._error or RepoError(f"disk {self.vdi}: aborted")
        self.shutdown()
