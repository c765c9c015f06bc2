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
import time
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
    backend: Backend, index: Index, lease: locks.Lease, *, gc_wait: float | None, who: str
) -> set[bytes]:
    """Digests of ``index`` deleted (or being deleted) by a GC run. See jobs/gc.py.

    ``lease`` is the writer's lease (its start time dates what the writer may have read; it is
    refreshed while waiting); ``gc_wait`` bounds the wait for a run (None: as long as it lives);
    ``who`` names the writer in errors.
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
        wait_for_gc_run(backend, info.key, meta, lease, gc_wait=gc_wait, who=who)
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
) -> None:
    """Wait until the GC run that published ``list_key`` can no longer delete anything."""
    done_key = list_key[: -len(".list")] + ".done"
    lease_key = str(meta.get("lease", ""))
    token = meta.get("token")
    # By default wait as long as the run holds its lease (it is making progress: a sweep of
    # millions of chunks takes minutes); ``gc_wait`` bounds it for callers that prefer to fail.
    limit = float("inf") if gc_wait is None else gc_wait
    deadline = time.monotonic() + limit
    delay = 0.05
    while True:
        if backend.exists(done_key):
            return
        held = locks.read_lease(backend, lease_key) if lease_key else None
        if held is None or held.token != token or held.expired():
            return  # that run is dead or finished: it deletes nothing more
        if time.monotonic() > deadline:
            raise RepoError(f"{who}: GC run {list_key} still running after {limit:.0f} s")
        lease.refresh()
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
