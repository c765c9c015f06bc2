"""The serve export without a socket: extents from the index, reads through the chunk cache,
its memory bound, single-flight fetches and read-ahead for sequential readers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.export import DATA, HOLE, ExportError
from orchestrator.repo.codec import CHUNK_SIZE
from orchestrator.repo.repository import Repository
from orchestrator.serve.cache import ChunkCache
from orchestrator.serve.export import PointExport, PointExports
from tests.repo_ops.helpers import backup
from tests.serve.conftest import model_disk


@pytest.fixture
def opened(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    disk = model_disk(7)
    rid, keys = backup(repo, "vm-1", [disk])
    index = repo.read_index(keys[disk.vdi])
    export = PointExport(repo, index, name=disk.vdi, point_id=rid, cache_bytes=4 * CHUNK_SIZE)
    yield disk, export
    export.shutdown()
    repo.close()


def test_extents_come_from_the_index(opened):
    disk, export = opened
    runs = export.extents()
    assert sum(n for _, n, _ in runs) == disk.size
    for off, n, kind in runs:
        data = disk.data[off : off + n]
        assert (kind == HOLE) == (not any(data)), (off, n, kind)
    # written-but-zero chunk 14 is a hole; a range inside a chunk is clipped
    assert export.extents(14 * CHUNK_SIZE + 5, 10) == [(14 * CHUNK_SIZE + 5, 10, HOLE)]
    assert export.extents(CHUNK_SIZE - 1, 2) == [(CHUNK_SIZE - 1, 2, DATA)]
    assert export.cache.stats["fetched"] == 0  # metadata only


def test_reads_at_any_offset(opened):
    disk, export = opened
    for off, n in [
        (0, 1),
        (CHUNK_SIZE - 3, 7),
        (3 * CHUNK_SIZE, 5 * CHUNK_SIZE),
        (disk.size - 1000, 1000),
        (0, disk.size),
    ]:
        assert export.read(off, n) == bytes(disk.data[off : off + n])
    with pytest.raises(ExportError):
        export.plan_read(disk.size - 1, 2)


def test_cache_is_bounded(opened):
    disk, export = opened
    export.read(0, disk.size)
    assert export.cache.cached_bytes <= 4 * CHUNK_SIZE


def test_sequential_reader_gets_read_ahead(opened):
    disk, export = opened
    export.read(0, CHUNK_SIZE)  # first read: not known to be sequential
    assert export.cache.stats["prefetched"] == 0
    export.read(CHUNK_SIZE, CHUNK_SIZE)  # continues it: read-ahead of the next stored chunks
    assert export.cache.stats["prefetched"] > 0


def test_single_flight_and_errors():
    calls: list[int] = []
    gate = threading.Event()

    def fetch(i):
        calls.append(i)
        gate.wait(30)
        if i == 3:
            raise OSError("backend down")
        return bytes([i]) * 10

    with ThreadPoolExecutor(8) as pool:
        cache = ChunkCache(fetch, pool, capacity=25, prefetch=2, count=10)
        futures = [pool.submit(cache.get, 1) for _ in range(5)]
        deadline = time.monotonic() + 30
        while cache.stats["waits"] + cache.stats["misses"] < 5 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        gate.set()
        assert {f.result() for f in futures} == {b"\x01" * 10}
        assert calls == [1]  # five readers, one fetch
        with pytest.raises(OSError):
            cache.get(3)
        assert 3 not in cache  # a failed fetch is not cached; the next get tries again
        cache.get(2)
        cache.get(4)
        assert cache.cached_bytes <= 25


def test_export_names():
    names = PointExports(["a", "b"], None)
    assert names.get("a").vdi == "a"
    with pytest.raises(Exception, match="several disks"):
        names.get("")
    with pytest.raises(Exception, match="no disk"):
        names.get("zzz")
    assert PointExports(["a"], "a").get("").vdi == "a"
