"""One restore point disk as an NBD export, and the export names of ``fastpath serve``.

:class:`PointExport` gives the interface the agent's NBD connection
(``agent.nbd.connection.Connection``) serves, computed from a disk index and a
:class:`~orchestrator.serve.cache.ChunkCache` instead of a VHD chain:

- ``extents(offset, length)``: ``base:allocation`` from the index alone (no chunk is read): a
  zero chunk (``ZERO_DIGEST``) is a hole (``HOLE|ZERO``), every stored chunk is data;
- ``changed(offset, length)``: ``fastpath:changed`` as the agent defines it without a base (every
  stored chunk);
- ``plan_read(offset, length)``: ``(HOLE, n)`` pieces for zero chunks and ``(BYTES, data)`` pieces
  cut from decoded chunks; every chunk was checked against its index digest when it was fetched
  (the codec authenticates encrypted chunks; the plaintext digest is recomputed as restore does).

:class:`PointExports` stands where the agent has its ticket store: export names are the VDI
uuids of the restore point's disks, and ``""`` (the default export, what ``nbd://host:port``
asks for) is the disk chosen with ``--disk`` (or the only disk). Names never expire.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent.export import BYTES, DATA, HOLE, ExportError
from agent.tickets import TicketError
from orchestrator.repo.codec import ZERO_DIGEST
from orchestrator.repo.errors import RepoError
from orchestrator.serve.cache import ChunkCache


def _merge(runs: list[tuple[int, int, Any]]) -> list[tuple[int, int, Any]]:
    out: list[list] = []
    for off, n, kind in runs:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n, kind])
    return [tuple(r) for r in out]


class PointExport:
    """A disk of a restore point, read through a bounded chunk cache. Thread-safe."""

    def __init__(
        self,
        repo,
        index,
        *,
        name: str,
        point_id: str,
        cache_bytes: int = 256 << 20,
        prefetch: int = 8,
        threads: int = 8,
    ):
        self.repo = repo
        self.index = index
        self.name = name
        self.point_id = point_id
        self.size = index.virtual_size
        self.chunk_size = index.chunk_size
        self.count = len(index)
        self._zero = bytearray(1 if index.get(i) == ZERO_DIGEST else 0 for i in range(self.count))
        # Two pools: read-ahead fetches never wait on anything, so a request's fetch waiting on
        # one (single flight) cannot deadlock a pool whose threads all wait.
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="serve-fetch")
        self._ahead_pool = ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="serve-ahead")
        self.cache = ChunkCache(
            self._fetch,
            self._ahead_pool,
            capacity=cache_bytes,
            prefetch=prefetch,
            count=self.count,
            skip=lambda i: bool(self._zero[i]),
        )
        self._closed = False
        self._lock = threading.Lock()

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Called by the agent's ExportCache after a disk's last connection: kept open, so a
        client that reconnects finds its chunks still cached (``shutdown`` ends it)."""

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._ahead_pool.shutdown(wait=False, cancel_futures=True)

    def check(self) -> None:
        """The agent's connection calls this after streamed pieces; a repository never
        changes under a committed index."""

    @property
    def description(self) -> str:
        stored = self.count - sum(self._zero)
        return (
            f"fastpath restore point {self.point_id} disk {self.index.disk_uuid}: "
            f"{self.count} chunks of {self.chunk_size} bytes, {stored} stored"
        )

    # -- chunks ---------------------------------------------------------------------------------

    def chunk_length(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def _fetch(self, i: int) -> bytes:
        digest = self.index.get(i)
        data = self.repo.read_chunk(digest, self.chunk_length(i))
        if self.repo.codec.digest(data) != digest:
            raise RepoError(f"chunk {i} of disk {self.index.disk_uuid}: digest mismatch")
        return data

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ExportError(f"range [{offset}, +{length}) outside the export ({self.size} bytes)")

    # -- metadata -------------------------------------------------------------------------------

    def _runs(self, offset: int, length: int, kind_of) -> list[tuple[int, int, Any]]:
        self._check_range(offset, length)
        cs = self.chunk_size
        runs = []
        pos, end = offset, offset + length
        while pos < end:
            i = pos // cs
            nxt = min((i + 1) * cs, end)
            runs.append((pos, nxt - pos, kind_of(i)))
            pos = nxt
        return _merge(runs)

    def extents(self, offset: int = 0, length: int | None = None):
        """[(offset, length, DATA|HOLE)] covering the range, merged."""
        if length is None:
            length = self.size - offset
        return self._runs(offset, length, lambda i: HOLE if self._zero[i] else DATA)

    def changed(self, offset: int = 0, length: int | None = None):
        """[(offset, length, bool)]: True on stored chunks (no base: everything allocated)."""
        if length is None:
            length = self.size - offset
        return self._runs(offset, length, lambda i: not self._zero[i])

    # -- reads ----------------------------------------------------------------------------------

    def plan_read(self, offset: int, length: int) -> list[tuple]:
        """Pieces covering [offset, offset+length): (HOLE, n) or (BYTES, data)."""
        self._check_range(offset, length)
        if length == 0:
            return []
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        sequential = self.cache.note_read(first, last)
        wanted = [i for i in range(first, last + 1) if not self._zero[i]]
        # The request's own chunks first (in parallel when there are several), then read-ahead.
        if len(wanted) > 1:
            futures = {i: self._pool.submit(self.cache.get, i) for i in wanted[1:]}
        else:
            futures = {}
        if sequential:
            self.cache.read_ahead(last)
        pieces: list[tuple] = []
        pos, end = offset, offset + length
        for i in range(first, last + 1):
            start = i * cs
            n = min(start + cs, end) - pos
            if self._zero[i]:
                if pieces and pieces[-1][0] == HOLE:
                    pieces[-1] = (HOLE, pieces[-1][1] + n)
                else:
                    pieces.append((HOLE, n))
            else:
                try:
                    data = futures[i].result() if i in futures else self.cache.get(i)
                except RepoError as exc:
                    raise ExportError(f"chunk {i}: {exc}") from exc
                within = pos - start
                pieces.append((BYTES, memoryview(data)[within : within + n]))
            pos += n
        return pieces

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of [offset, offset+length) (tests)."""
        return b"".join(
            bytes(p[1]) if p[0] == BYTES else b"\0" * p[1] for p in self.plan_read(offset, length)
        )


class _Name:
    """What the agent's connection needs of a ticket: an id."""

    __slots__ = ("id", "vdi")

    def __init__(self, name: str, vdi: str):
        self.id = name
        self.vdi = vdi

    def usable(self, now=None) -> bool:
        return True


class PointExports:
    """The export names of one restore point, in the shape of ``agent.tickets.TicketStore``
    (``get``/``acquire``/``release``/``list``/``add_listener``) so the agent's NBDServer serves
    them unchanged. ``exports[name]`` -> VDI uuid; ``""`` is the default disk."""

    def __init__(self, disks: list[str], default: str | None):
        self.names: dict[str, str] = {vdi: vdi for vdi in disks}
        if default is not None:
            self.names[""] = default
        self._disks = list(disks)

    def get(self, name: str) -> _Name:
        vdi = self.names.get(name)
        if vdi is None:
            if name == "":
                raise TicketError(
                    "this restore point has several disks: name one as the export "
                    f"({', '.join(self._disks)}) or start serve with --disk"
                )
            raise TicketError(f"no disk {name!r} in this restore point")
        return _Name(vdi, vdi)  # one export (and one cache) per disk, whatever name it came by

    acquire = get

    def release(self, name: str) -> None:
        pass

    def list(self) -> list[_Name]:
        return [_Name(v, v) for v in self._disks]

    def add_listener(self, fn) -> None:
        pass
