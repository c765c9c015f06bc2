"""The backup writer: round trips against a bytearray model, dedup, zero chunks, bounded memory,
commit order, errors."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from orchestrator.repo.codec import CHUNK_SIZE, ZERO_DIGEST, chunk_key
from orchestrator.repo.errors import RepoError
from orchestrator.repo.repository import Repository
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import DiskModel, backup, chunk_bytes, restore

VM = "11111111-2222-3333-4444-555555555555"


def stored_chunks(repo) -> set[str]:
    return {i.key for i in repo.backend.list("chunks/")}


def test_full_and_incremental_round_trip(any_repo):
    repo = any_repo
    disk = DiskModel(chunks=5, tail=4096 + 512, seed=1)
    for i in (0, 2, 5):
        disk.write_chunk(i, seed=100 + i)
    rid1, keys1 = backup(repo, VM, [disk])
    full = bytes(disk.data)
    assert restore(repo, keys1[disk.vdi]) == full

    disk.write_chunk(1, seed=201)  # hole -> data
    disk.write_chunk(2, bytes(CHUNK_SIZE))  # data -> zeros
    disk.write_chunk(5, seed=205)  # short last chunk changes
    rid2, keys2 = backup(repo, VM, [disk], bases=keys1)
    assert restore(repo, keys2[disk.vdi]) == bytes(disk.data)
    # the first restore point is untouched (every index is complete on its own)
    assert restore(repo, keys1[disk.vdi]) == full
    idx2 = repo.read_index(keys2[disk.vdi])
    assert idx2.base == keys1[disk.vdi]
    assert idx2.get(2) == ZERO_DIGEST and idx2.get(3) == ZERO_DIGEST
    points = repo.list_restore_points()
    assert [p.id for p in points] == [rid1, rid2]
    assert repo.resolve("latest").id == rid2
    assert repo.resolve(f"{VM}/latest").id == rid2
    meta = repo.read_metadata(repo.resolve(rid2))
    assert meta["disks"][0]["index"] == keys2[disk.vdi]
    assert meta["stats"]["chunks_new"] == 2  # chunk 1 and the new tail; zeros are not stored


def test_zero_chunks_never_stored_and_stats(repo):
    disk = DiskModel(chunks=3, seed=2)
    with repo.begin_backup(VM) as s:
        w = s.disk_writer(disk.vdi, disk.vdi, disk.size)
        w.put_chunk(0, bytes(CHUNK_SIZE))
        w.put_chunk(1, chunk_bytes(7))
        w.put_chunk(2, chunk_bytes(7))  # same content twice in one disk
        w.commit()
        s.commit()
    assert w.stats.chunks_zero == 1
    assert w.stats.chunks_new + w.stats.chunks_deduped == 2
    assert len(stored_chunks(repo)) == 1
    assert w.stats.logical_bytes == 3 * CHUNK_SIZE
    assert 0 < w.stats.bytes_written < CHUNK_SIZE + 100  # half of the chunk is compressible


def test_dedup_across_vms_and_lookup_confirmation(repo):
    a = DiskModel(chunks=4, seed=3)
    for i in range(4):
        a.write_chunk(i, seed=300 + i)
    backup(repo, VM, [a])
    before = stored_chunks(repo)
    b = DiskModel(chunks=4, seed=4)  # another VM, same template content + one own chunk
    for i in range(3):
        b.write_chunk(i, seed=300 + i)
    b.write_chunk(3, seed=999)
    vm2 = str(uuid.uuid4())
    repo.backend.reset()
    with repo.begin_backup(vm2) as s:
        w = s.disk_writer(b.vdi, b.vdi, b.size)
        for i in range(4):
            w.put_chunk(i, b.chunk(i))
        key = w.commit()
        s.commit()
    assert w.stats.chunks_deduped_repo == 3 and w.stats.chunks_new == 1
    assert len(stored_chunks(repo)) == len(before) + 1
    # every lookup hit was confirmed against the store before being relied on
    assert repo.backend.count("exists", "chunks") >= 3
    assert repo.backend.count("put", "chunks") == 1
    assert restore(repo, key) == bytes(b.data)


def test_dedup_lookup_prefix_collision_is_confirmed(repo, monkeypatch):
    """A lookup hit for a chunk that is not in the store (a prefix collision, or a chunk GC
    removed) must be uploaded, not trusted."""
    disk = DiskModel(chunks=1, seed=5)
    disk.write_chunk(0, seed=50)
    with repo.begin_backup(VM) as s:
        monkeypatch.setattr(type(s.lookup), "may_contain", lambda self, d: True)
        w = s.disk_writer(disk.vdi, disk.vdi, disk.size)
        w.put_chunk(0, disk.chunk(0))
        key = w.commit()
        s.commit()
    assert w.stats.chunks_new == 1
    assert restore(repo, key) == bytes(disk.data)


def test_encrypted_round_trip_and_dedup(encrypted_repo, tmp_path):
    repo = encrypted_repo
    disk = DiskModel(chunks=2, tail=1000, seed=6)
    for i in range(3):
        disk.write_chunk(i, seed=60 + i)
    _, keys = backup(repo, VM, [disk])
    again = Repository.open(repo.backend, passphrase=PASSPHRASE)
    assert restore(again, keys[disk.vdi]) == bytes(disk.data)
    other = DiskModel(chunks=2, tail=1000, seed=6)
    other.data[:] = disk.data
    n = len(stored_chunks(repo))
    vm2 = str(uuid.uuid4())
    with again.begin_backup(vm2) as s:
        w = s.disk_writer(other.vdi, other.vdi, other.size)
        for i in range(3):
            w.put_chunk(i, other.chunk(i))
        w.commit()
        s.commit()
    assert w.stats.chunks_deduped == 3 and len(stored_chunks(repo)) == n
    # a plaintext digest does not name an encrypted repository's chunk (keyed BLAKE3)
    plain = Repository.init(tmp_path / "plain")
    assert plain.codec.digest(disk.chunk(0)) != repo.codec.digest(disk.chunk(0))


def test_index_written_after_every_chunk_is_durable(repo):
    """The index is the commit point: no index put before the last chunk put completed."""
    disk = DiskModel(chunks=6, seed=7)
    for i in range(6):
        disk.write_chunk(i, seed=70 + i)
    repo.backend.reset()
    backup(repo, VM, [disk])
    verbs = [(v, k) for v, k in repo.backend.log if v in ("put", "put_if_absent")]
    last_chunk = max(n for n, (v, k) in enumerate(verbs) if k.startswith("chunks/"))
    first_index = min(n for n, (v, k) in enumerate(verbs) if k.endswith((".index", ".pending")))
    json_put = max(n for n, (v, k) in enumerate(verbs) if k.endswith(".json") and "locks" not in k)
    assert last_chunk < first_index < json_put


def test_bounded_chunks_in_flight(repo):
    """put_chunk blocks when max_in_flight chunks are being stored (bounded memory)."""
    gate = threading.Event()
    active = []
    peak = [0]
    lock = threading.Lock()

    def slow_put(key):
        if key.startswith("chunks/"):
            with lock:
                active.append(key)
                peak[0] = max(peak[0], len(active))
            gate.wait(5)
            with lock:
                active.remove(key)

    repo.backend.before["put"] = slow_put
    disk = DiskModel(chunks=10, seed=8)
    for i in range(10):
        disk.write_chunk(i, seed=80 + i)
    with repo.begin_backup(VM) as s:
        w = s.disk_writer(disk.vdi, disk.vdi, disk.size, concurrency=2, max_in_flight=3)
        returned = []

        def feed():
            for i in range(10):
                w.put_chunk(i, disk.chunk(i))
                returned.append(i)

        t = threading.Thread(target=feed)
        t.start()
        deadline = time.monotonic() + 5
        while len(returned) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(returned) == 3  # the 4th put_chunk is blocked
        gate.set()
        t.join(10)
        key = w.commit()
        s.commit()
    assert peak[0] <= 2
    assert restore(repo, key) == bytes(disk.data)


def test_store_error_fails_commit_and_writes_no_index(repo):
    def boom(key):
        if key.startswith("chunks/"):
            raise RepoError(f"injected failure on {key}")

    repo.backend.before["put"] = boom
    disk = DiskModel(chunks=2, seed=9)
    disk.write_chunk(0, seed=90)
    with pytest.raises(RepoError, match="injected"):
        with repo.begin_backup(VM) as s:
            w = s.disk_writer(disk.vdi, disk.vdi, disk.size)
            w.put_chunk(0, disk.chunk(0))
            w.commit()
    assert not [i.key for i in repo.backend.list("backups/")]
    assert not [i.key for i in repo.backend.list("locks/writers/")]


def test_abort_removes_committed_indexes_of_the_session(repo):
    disk = DiskModel(chunks=1, seed=10)
    disk.write_chunk(0, seed=91)
    s = repo.begin_backup(VM)
    w = s.disk_writer(disk.vdi, disk.vdi, disk.size)
    w.put_chunk(0, disk.chunk(0))
    w.commit()
    s.abort()
    assert not list(repo.backend.list("backups/"))
    assert repo.list_restore_points() == []


def test_put_chunk_checks_length_and_range(repo):
    disk = DiskModel(chunks=1, tail=512, seed=11)
    with repo.begin_backup(VM) as s:
        w = s.disk_writer(disk.vdi, disk.vdi, disk.size)
        with pytest.raises(ValueError):
            w.put_chunk(1, bytes(CHUNK_SIZE))  # the tail chunk is 512 bytes
        with pytest.raises(IndexError):
            w.put_chunk(2, bytes(512))
        w.put_chunk(1, b"\1" * 512)
        key = w.commit()
        s.commit()
    assert restore(repo, key)[-512:] == b"\1" * 512
    assert chunk_key(repo.codec.digest(b"\1" * 512)) in stored_chunks(repo)


def test_session_commit_requires_every_disk_committed(repo):
    disk = DiskModel(chunks=1, seed=12)
    with repo.begin_backup(VM) as s:
        s.disk_writer(disk.vdi, disk.vdi, disk.size)
        with pytest.raises(RepoError, match="not committed"):
            s.commit()


@pytest.mark.parametrize("encrypted", [False, True])
def test_compression_stats(tmp_path, encrypted):
    repo = Repository.init(
        tmp_path / "r", encrypt=encrypted, passphrase=PASSPHRASE if encrypted else None
    )
    disk = DiskModel(chunks=2, seed=13)
    disk.write_chunk(0, seed=1)  # half repetitive text: compresses
    disk.write_chunk(1, os.urandom(CHUNK_SIZE))  # incompressible: stored raw
    with repo.begin_backup(VM) as s:
        w = s.disk_writer(disk.vdi, disk.vdi, disk.size)
        w.put_chunk(0, disk.chunk(0))
        w.put_chunk(1, disk.chunk(1))
        w.commit()
        s.commit()
    st = w.stats
    assert st.compressed_chunks == 1 and st.new_plain_bytes == 2 * CHUNK_SIZE
    assert CHUNK_SIZE < st.compressed_bytes < 1.6 * CHUNK_SIZE
    overhead = 16 + (12 + 16 if encrypted else 0)  # header (+ nonce and tag)
    assert st.bytes_written == st.compressed_bytes + 2 * overhead


def test_a_resized_incremental_must_put_the_chunks_whose_length_changed(repo):
    disk = DiskModel(chunks=2, tail=4096, seed=14)
    for i in range(3):
        disk.write_chunk(i, seed=140 + i)
    _, keys = backup(repo, VM, [disk])
    grown = 3 * CHUNK_SIZE + 512  # the old 4 KiB tail becomes a full chunk, a new tail appears
    with repo.begin_backup(VM) as s:
        w = s.disk_writer(disk.vdi, disk.vdi, grown, base=keys[disk.vdi])
        assert w.must_put == {2}
        with pytest.raises(RepoError, match=r"resized .* put chunk\(s\) \[2\]"):
            w.commit()
        model = bytearray(disk.data) + bytearray(grown - disk.size)
        model[2 * CHUNK_SIZE : 3 * CHUNK_SIZE] = chunk_bytes(150)
        w.put_chunk(2, bytes(model[2 * CHUNK_SIZE : 3 * CHUNK_SIZE]))
        key = w.commit()
        s.commit()
    assert restore(repo, key) == bytes(model)
    with repo.begin_backup(VM) as s:  # shrink into the middle of chunk 1
        w = s.disk_writer(disk.vdi, disk.vdi, CHUNK_SIZE + 1024, base=key)
        assert w.must_put == {1}
        w.put_chunk(1, bytes(model[CHUNK_SIZE : CHUNK_SIZE + 1024]))
        small = w.commit()
        s.commit()
    assert restore(repo, small) == bytes(model[: CHUNK_SIZE + 1024])
