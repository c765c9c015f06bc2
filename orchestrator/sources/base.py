"""The Source interface: where a disk's 2 MiB blocks come from during a backup.

A source is opened for one disk (a VDI snapshot, an NBD/HTTP export, a VHD file) and answers a
:class:`DiskPlan` — the disk's size, its block size and the blocks worth reading (the allocated
ones for a full backup, the changed ones for an incremental) — then reads many blocks
concurrently through :meth:`Source.read_blocks`, which yields ``(block index, bytes)`` in any
order with a bounded number of blocks in flight (memory stays flat whatever the disk size).

Every source reads with its own connections/threads; the pipeline (orchestrator.jobs.pipeline)
only iterates. Closing the iterator (or ``close()``) stops the readers.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

BLOCK_SIZE = 2 << 20


class SourceError(Exception):
    """A source failed (after its retries); the message names the source and what failed."""


class SourceUnavailable(SourceError):
    """The source cannot be used at all here (not installed, refused, unreachable at open).

    ``auto`` transport selection falls back to the next transport on this error only."""


class Stopped(Exception):
    """Raised inside reader threads when the consumer went away."""


@dataclass
class DiskPlan:
    size: int
    block_size: int
    blocks: list[int]
    incremental: bool
    transport: str
    notes: list[str] = field(default_factory=list)

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_size)

    def block_length(self, i: int) -> int:
        return min(self.block_size, self.size - i * self.block_size)

    @property
    def bytes_to_read(self) -> int:
        return sum(self.block_length(i) for i in self.blocks)


def fold_cbt_bitmap(
    bitmap: bytes, size: int, block_size: int = BLOCK_SIZE, bit_size: int = 64 << 10
):
    """XAPI's CBT bitmap (MSB first, one bit per 64 KiB) folded to the blocks of ``block_size``."""
    per = block_size // bit_size
    count = -(-size // block_size)
    out = []
    nbits = len(bitmap) * 8
    for b in range(count):
        first = b * per
        if first >= nbits:
            break
        last = min(first + per, nbits)
        for bit in range(first, last):
            if bitmap[bit >> 3] & (0x80 >> (bit & 7)):
                out.append(b)
                break
    return out


class Source:
    """Base class. Subclasses implement ``open`` and ``_workers``."""

    name = "source"
    # Can read_blocks() read any block of the disk, not only plan.blocks? (False for a stream
    # that carries only the changed blocks, such as XAPI's VHD export against a base.)
    reads_any_block = True

    def __init__(self, *, max_in_flight: int = 16):
        self.max_in_flight = max(1, max_in_flight)
        self.plan: DiskPlan | None = None
        self.bytes_read = 0
        self.retries = 0
        self._lock = threading.Lock()

    # -- to implement ------------------------------------------------------------------------------

    def open(self, blocks: Sequence[int] | None = None) -> DiskPlan:
        """Connect and plan. ``blocks`` (e.g. from CBT) overrides which blocks are read."""
        raise NotImplementedError

    def _workers(self, blocks: list[int]) -> list[Callable[[Callable[[int, bytes], None]], None]]:
        """Reader functions; each is called with ``emit(index, data)`` in its own thread."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- shared machinery ------------------------------------------------------------------------

    def describe(self) -> str:
        return self.name

    def read_blocks(self, blocks: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield (index, data) for every block, in any order, bounded in memory."""
        if self.plan is None:
            raise SourceError(f"{self.describe()}: read before open")
        todo = sorted(set(self.plan.blocks if blocks is None else blocks))
        if not todo:
            return iter(())
        return _run(self, self._workers(todo), self.max_in_flight)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_DONE = object()


def _run(source: Source, workers, max_in_flight: int) -> Iterator[tuple[int, bytes]]:
    q: queue.Queue = queue.Queue(maxsize=max_in_flight)
    stop = threading.Event()

    def emit(index: int, data: bytes) -> None:
        source._count(len(data))
        while True:
            if stop.is_set():
                raise Stopped()
            try:
                q.put((index, data), timeout=0.2)
                return
            except queue.Full:
                continue

    def run(fn):
        try:
            fn(emit)
            item = _DONE
        except Stopped:
            item = _DONE
        except BaseException as exc:
            item = exc
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    threads = [
        threading.Thread(target=run, args=(fn,), name=f"{source.name}-{k}", daemon=True)
        for k, fn in enumerate(workers)
    ]

    def gen():
        for t in threads:
            t.start()
        running = len(threads)
        try:
            while running:
                item = q.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, BaseException):
                    if isinstance(item, SourceError):
                        raise item
                    raise SourceError(f"{source.describe()}: {item}") from item
                else:
                    yield item
        finally:
            stop.set()
            deadline = time.monotonic() + 30
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))

    return gen()


def split_round_robin(items: list[int], n: int) -> list[list[int]]:
    n = max(1, min(n, len(items)))
    return [items[k::n] for k in range(n)]


def split_ranges(items: list[int], n: int) -> list[list[int]]:
    """Contiguous slices (for streams that cover a block range)."""
    n = max(1, min(n, len(items)))
    size = -(-len(items) // n)
    return [items[k : k + size] for k in range(0, len(items), size)]
