"""The compact cross-VM dedup lookup: exactness of hits, RAM per TB, the cached copy."""

from __future__ import annotations

import os
import tracemalloc
import uuid

import numpy as np
import pytest

from orchestrator.jobs.gc import run_gc
from orchestrator.repo.dedup import CACHE_KEY, DigestLookup, KnownDigests
from orchestrator.repo.errors import RepoError
from tests.repo_ops.helpers import DiskModel, backup

CHUNKS_PER_TB = 10**12 // (2 * 1024 * 1024)  # 476837 chunks of 2 MiB in 1 TB
CHUNKS_PER_TIB = 524288
BUDGET_PER_TB = 10 * 10**6  # 10 MB


def test_lookup_ram_per_tb_is_within_budget():
    """Build the lookup of 1 TiB of unique data (524288 chunks) and measure what it keeps."""
    entries = os.urandom(32 * CHUNKS_PER_TIB)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        lookup = DigestLookup()
        lookup.add_many([("backups/x/y/z.index", entries)])
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(lookup) == CHUNKS_PER_TIB
    assert lookup.nbytes == 8 * CHUNKS_PER_TIB  # 4 MiB per TiB, exactly
    per_tb = retained * CHUNKS_PER_TB / CHUNKS_PER_TIB
    print(
        f"dedup lookup: {lookup.nbytes} bytes array, {retained} bytes retained per TiB, "
        f"{per_tb / 1e6:.2f} MB per TB"
    )
    assert per_tb <= BUDGET_PER_TB
    # every added digest is found; random others are not (a prefix hit would be confirmed)
    for k in range(0, CHUNKS_PER_TIB, 4099):
        assert lookup.may_contain(entries[32 * k : 32 * k + 32])
    assert sum(lookup.may_contain(os.urandom(32)) for _ in range(2000)) == 0


def test_zero_entries_are_not_digests():
    lookup = DigestLookup()
    lookup.add_entries("k", bytes(64) + b"\x01" * 32)
    assert len(lookup) == 1 and not lookup.may_contain(bytes(32))


def test_incremental_adds_keep_the_array_sorted_and_unique():
    lookup = DigestLookup()
    parts = [os.urandom(32 * 100) for _ in range(5)]
    for n, part in enumerate(parts):
        lookup.add_entries(f"k{n}", part + parts[0][:320])
    lookup.add_digest(parts[1][:32])
    arr = lookup._prefixes
    assert len(arr) == 500 and bool(np.all(arr[1:] > arr[:-1]))
    assert lookup.index_keys == {f"k{n}" for n in range(5)}


def test_cache_round_trip_and_damage():
    lookup = DigestLookup()
    lookup.add_entries("backups/a/b/c.index", os.urandom(32 * 50))
    data = lookup.encode()
    back = DigestLookup.decode(data)
    assert back.index_keys == lookup.index_keys
    assert np.array_equal(back._prefixes, lookup._prefixes)
    for bad in (data[:-1], b"XXXXXXXX" + data[8:], data + b"\0" * 8):
        with pytest.raises(RepoError, match="dedup cache"):
            DigestLookup.decode(bad)


def test_known_digests_are_exact_beyond_the_prefix():
    a = os.urandom(32)
    twin = a[:8] + os.urandom(24)  # same 8-byte prefix, different digest
    known = KnownDigests(a + bytes(32))
    assert a in known and twin not in known and bytes(32) not in known
    assert len(known) == 1


def test_writer_uses_the_cache_and_reads_only_newer_indexes(repo):
    disks = []
    for n in range(3):
        d = DiskModel(chunks=1, seed=n)
        d.write_chunk(0, seed=n)
        backup(repo, str(uuid.UUID(int=n + 1)), [d])
        disks.append(d)
    run_gc(repo, margin=0)  # writes the cache covering those three indexes
    assert repo.backend.exists(CACHE_KEY)
    late = DiskModel(chunks=1, seed=9)
    late.write_chunk(0, seed=9)
    backup(repo, str(uuid.UUID(int=9)), [late])
    repo._lookup = None  # a fresh process
    repo.backend.reset()
    lookup = repo.dedup_lookup()
    index_reads = [k for v, k in repo.backend.log if v == "get" and k.endswith(".index")]
    assert len(index_reads) == 1  # only the index committed after the cache
    for d in disks + [late]:
        assert lookup.may_contain(repo.codec.digest(d.chunk(0)))


def test_a_writer_that_read_many_uncached_indexes_saves_the_cache(repo, monkeypatch):
    import orchestrator.repo.repository as repository

    monkeypatch.setattr(repository, "CACHE_REFRESH_AFTER", 2)
    for n in range(3):
        d = DiskModel(chunks=1, seed=20 + n)
        d.write_chunk(0, seed=20 + n)
        backup(repo, str(uuid.UUID(int=20 + n)), [d])
    repo._lookup = None
    repo.dedup_lookup()
    cached = DigestLookup.decode(repo.backend.get(CACHE_KEY))
    assert len(cached.index_keys) == 3 and len(cached) == 3
