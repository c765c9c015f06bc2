"""Damage marks: chunks ``verify --mark`` found damaged, so that the next backup heals them.

Keys::

    damaged/<digest hex>     JSON {"digest", "error", "marked"}: this chunk object is damaged

A mark is written by ``fastpath verify --mark`` (:mod:`orchestrator.jobs.verify`) for every chunk
that failed its digest twice (:meth:`orchestrator.repo.repository.Repository.read_chunk_object`
reads a chunk again once before calling it damaged: a fault on the wire is not damage).
A backup session loads the marks once (one listing); its writer never deduplicates onto a marked
chunk: the first disk of a later backup that produces it stores it again, which replaces the
damaged object under the same key and clears the mark, so every restore point sharing the chunk is
healed. ``fastpath repair`` (:mod:`orchestrator.jobs.repair`) heals marked chunks from a copy.
"""

from __future__ import annotations

import json
import time

from orchestrator.repo.backends import Backend
from orchestrator.repo.codec import DIGEST_SIZE

DAMAGED_PREFIX = "damaged/"


def damage_key(digest: bytes) -> str:
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"a chunk digest is {DIGEST_SIZE} bytes, not {len(digest)}")
    return f"{DAMAGED_PREFIX}{digest.hex()}"


def mark_damaged(backend: Backend, digest: bytes, error: str) -> None:
    doc = {
        "digest": digest.hex(),
        "error": error,
        "marked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    backend.put(damage_key(digest), json.dumps(doc, sort_keys=True).encode())


def clear_mark(backend: Backend, digest: bytes) -> None:
    backend.delete(damage_key(digest))


def damaged_digests(backend: Backend) -> set[bytes]:
    """Every marked digest (one listing; keys that are not marks are ignored)."""
    out = set()
    for info in backend.list(DAMAGED_PREFIX):
        name = info.key[len(DAMAGED_PREFIX) :]
        if len(name) == 2 * DIGEST_SIZE:
            try:
                out.add(bytes.fromhex(name))
            except ValueError:
                continue
    return out
