"""GC deletion lists: what a GC run publishes before deleting, and the writers' check against it.

Keys::

    locks/gc-deleted/<run>.list   digests a GC run is about to delete (published before any delete)
    locks/gc-deleted/<run>.done   written once that run can delete nothing more

A list is ``DELETION_MAGIC``, a 4-byte big-endian header length, a JSON header (``lease``,
``token`` of the run's GC lease, ...) and the sorted 32-byte digests.

GC (:mod:`orchestrator.jobs.gc`) writes the lists; a disk writer's commit
(:mod:`orchestrator.repo.writer`) reads them with :func:`vanished_digests` after writing its
pending index, waits for any run that named one of its digests, and re-puts the chunks that
run deleted. Why this is safe against prune + GC is argued in :mod:`orchestrator.jobs.gc`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from orchestrator.lazy import numpy as np
from orchestrator.repo import locks
from orchestrator.repo.backends import Backend
from orchestrator.repo.codec import DIGEST_SIZE, chunk_key
from orchestrator.repo.dedup import records
from orchestrator.repo.errors import NotFound, RepoError
from orchestrator.repo.index import Index

DELETIONS_PREFIX = "locks/gc-deleted/"
DELETION_MAGIC = b"FPGCDEL1"
WAIT_NOTICE_EVERY = 30.0  # seconds between "still waiting for GC run ..." messages

log = logging.getLogger(__name__)


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


# -- the writer's commit check against concurrent GC ---------------------------------------------


def vanished_digests(
    backend: Backend,
    index: Index,
    lease: locks.Lease,
    *,
    gc_wait: float | None,
    who: str,
    notify: Callable[[str], None] | None = None,
) -> set[bytes]:
    """Digests of ``index`` deleted (or being deleted) by a GC run. See jobs/gc.py.

    ``lease`` is the writer's lease (its start time dates what the writer may have read; it is
    refreshed while waiting); ``gc_wait`` bounds the wait for a run (None: as long as it lives);
    ``who`` names the writer in errors and messages; ``notify`` gets a line when the writer
    starts waiting for a run and every ``WAIT_NOTICE_EVERY`` seconds after (default: a log
    warning).
    """
    entries = {i.key: i for i in backend.list(DELETIONS_PREFIX)}
    lists = []
    for key, info in entries.items():
        if not key.endswith(".list"):
            continue
        done = entries.get(key[: -len(".list")] + ".done")
        if done is not None and done.mtime < lease.started:
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
        wait_for_gc_run(backend, info.key, meta, lease, gc_wait=gc_wait, who=who, notify=notify)
        for rec in common:
            digest = rec.tobytes()
            if not backend.exists(chunk_key(digest)):
                gone.add(digest)
    return gone


def wait_for_gc_run(
    backend: Backend,
    list_key: str,
    meta: dict[str, Any],
    lease: locks.Lease,
    *,
    gc_wait: float | None,
    who: str,
    notify: Callable[[str], None] | None = None,
) -> None:
    """Wait until the GC run that published ``list_key`` can no longer delete anything: its
    ``.done`` exists, or its lease is gone, expired, or held by a process that provably no
    longer runs (locks.holder_gone). Says what it waits for (``notify``) while it waits."""
    done_key = list_key[: -len(".list")] + ".done"
    lease_key = str(meta.get("lease", ""))
    token = meta.get("token")
    # By default wait as long as the run holds its lease (it is making progress: a sweep of
    # millions of chunks takes minutes); ``gc_wait`` bounds it for callers that prefer to fail.
    limit = float("inf") if gc_wait is None else gc_wait
    began = time.monotonic()
    deadline = began + limit
    next_notice = began  # say it at once, then every WAIT_NOTICE_EVERY seconds
    say = notify or log.warning
    delay = 0.05
    while True:
        if backend.exists(done_key):
            return
        held = locks.read_lease(backend, lease_key) if lease_key else None
        if held is None or held.token != token or held.expired():
            return  # that run is dead or finished: it deletes nothing more
        now = time.monotonic()
        if now > deadline:
            raise RepoError(
                f"{who}: GC run {meta.get('run', list_key)} ({held.holder()}) still running "
                f"after {limit:.0f} s"
            )
        if now >= next_notice:
            say(
                f"{who}: waiting for GC run {meta.get('run', list_key)} ({held.holder()}) to "
                f"finish deleting (it may delete chunks this backup uses); waited "
                f"{now - began:.0f} s, its lease expires in {max(0.0, held.expires_in()):.0f} s "
                f"unless it renews it"
            )
            next_notice = now + WAIT_NOTICE_EVERY
        lease.refresh()
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
