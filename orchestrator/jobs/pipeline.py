"""The backup data pipeline: source blocks -> repository chunks, bounded in memory.

    source.read_blocks()          I/O threads (libnbd aio per connection, HTTP streams, ...)
      -> bounded queue            ``Source.max_in_flight`` blocks at most
      -> DiskWriter.put_chunk     blocks while ``max_in_flight`` chunks are being stored
           zero check -> digest (BLAKE3) -> dedup check -> zstd / AES-GCM -> backend put
                                  in the writer's thread pool (these release the GIL)
      -> DiskWriter.commit        the index, after every chunk is durable

So the number of 2 MiB buffers alive at once is bounded by the source's and the writer's limits,
never by the disk's size: peak RSS is flat (tests/e2e/test_memory.py checks it).

One ``copy_disk`` per disk; a VM's disks run in parallel threads (``copy_disks``). ``cancel`` (a
threading.Event, set on Ctrl-C or when another disk failed) stops the readers; an interrupted
disk never commits its index.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orchestrator.repo.writer import ChunksVanished, DiskWriter
from orchestrator.sources.base import DiskPlan, Source, SourceError

MAX_VANISHED_ROUNDS = 3


class Cancelled(Exception):
    """The copy was interrupted (Ctrl-C, or another disk of the VM failed)."""


@dataclass
class DiskResult:
    vdi: str
    index_key: str
    transport: str
    incremental: bool
    blocks_read: int
    bytes_read: int
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def copy_disk(
    source: Source,
    plan: DiskPlan,
    writer: DiskWriter,
    *,
    vdi: str,
    cancel: threading.Event | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> DiskResult:
    """Read ``plan.blocks`` from ``source`` into ``writer`` and commit the disk's index."""
    cancel = cancel or threading.Event()
    started = time.monotonic()
    blocks_read = 0
    todo: list[int] | None = None
    damaged = [i for i in getattr(writer, "damaged_positions", ()) if i not in set(plan.blocks)]
    if damaged and not source.reads_any_block:
        plan.notes.append(
            f"{len(damaged)} unchanged block(s) whose stored chunk is marked damaged cannot be "
            f"read again through {plan.transport}: a full backup (--full) heals them"
        )
    elif damaged:
        # The base's chunk at these positions is marked damaged (verify --mark): an incremental
        # would inherit it unchanged. Read them again so this backup heals every point sharing it.
        todo = sorted(set(plan.blocks) | set(damaged))
        plan.notes.append(
            f"{len(damaged)} unchanged block(s) whose stored chunk is marked damaged read "
            "again (healing)"
        )
    for _round in range(MAX_VANISHED_ROUNDS + 1):
        it = source.read_blocks(todo)
        try:
            for i, data in it:
                if cancel.is_set():
                    raise Cancelled(f"disk {vdi}: interrupted")
                writer.put_chunk(i, data)
                blocks_read += 1
                if on_bytes is not None:
                    on_bytes(len(data))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if cancel.is_set():
            raise Cancelled(f"disk {vdi}: interrupted")
        try:
            key = writer.commit()
            break
        except ChunksVanished as exc:
            # A concurrent GC deleted chunks this index relies on: read those blocks again.
            todo = exc.positions
    else:
        raise SourceError(f"disk {vdi}: chunks kept vanishing under a concurrent GC")
    return DiskResult(
        vdi=vdi,
        index_key=key,
        transport=plan.transport,
        incremental=plan.incremental,
        blocks_read=blocks_read,
        bytes_read=source.bytes_read,
        seconds=time.monotonic() - started,
        stats=writer.stats.to_json(),
        notes=list(plan.notes),
    )


def copy_disks(jobs: list[dict[str, Any]], *, cancel: threading.Event, parallel: int = 4):
    """Run ``copy_disk(**job)`` for every job in parallel; the first failure cancels the others.

    Returns the DiskResults in job order; raises the first error (Cancelled ones last)."""
    results: list[DiskResult | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            results[k] = copy_disk(cancel=cancel, **jobs[k])
        except BaseException as exc:
            errors.append(exc)
            cancel.set()

    with ThreadPoolExecutor(max(1, min(parallel, len(jobs))), thread_name_prefix="disk") as pool:
        futures = [pool.submit(one, k) for k in range(len(jobs))]
        try:
            for f in futures:
                while not f.done():
                    try:
                        f.result(timeout=0.2)
                    except TimeoutError:
                        continue
        except BaseException:
            cancel.set()
            raise
    if errors:
        real = [e for e in errors if not isinstance(e, Cancelled)]
        raise (real or errors)[0]
    return results
