"""GC: mark from indexes and live writers, sweep the rest; races with backups and prune."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest

from orchestrator.jobs.gc import GcRefused, run_gc
from orchestrator.jobs.prune import RetentionPolicy, run_prune
from orchestrator.jobs.verify import run_check, run_verify
from orchestrator.repo import locks
from orchestrator.repo.codec import chunk_key
from orchestrator.repo.errors import NotFound, RepoError
from orchestrator.repo.writer import BackupSession, ChunksVanished
from tests.repo_ops.helpers import VANISHED, DiskModel, backup, commit_with_retry, restore


def chunk_set(repo) -> set[str]:
    return {i.key for i in repo.backend.list("chunks/")}


def settle(repo) -> None:
    """S3 mtimes have a 1 s resolution: a chunk written in the same second as GC's lease is
    (correctly) treated as possibly newer. Let the clock pass the next second."""
    if repo.url.startswith("s3://"):
        time.sleep(1.1)


def vm_id(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def test_gc_deletes_exactly_the_unreferenced_chunks(any_repo):
    repo = any_repo
    vm = vm_id(0)
    disk = DiskModel(chunks=3, seed=1)
    for i in range(3):
        disk.write_chunk(i, seed=10 + i)
    _, k1 = backup(repo, vm, [disk])
    old_chunk = chunk_key(repo.codec.digest(disk.chunk(0)))
    disk.write_chunk(0, seed=99)
    _, k2 = backup(repo, vm, [disk], bases=k1)
    assert run_gc(repo, margin=0)["chunks_deleted"] == 0  # both points still there
    run_prune(repo, RetentionPolicy(keep_last=1))
    settle(repo)
    size = repo.backend.stat(old_chunk).size
    assert run_gc(repo, margin=0, dry_run=True)["would_free"] == size
    report = run_gc(repo, margin=0)
    assert report["chunks_deleted"] == 1 and old_chunk not in chunk_set(repo)
    assert report["bytes_freed"] == size
    assert restore(repo, k2[disk.vdi]) == bytes(disk.data)
    assert run_verify(repo)["ok"]
    # the dedup cache written by GC covers the surviving index
    assert repo.backend.exists("cache/dedup-lookup")


def test_dry_run_deletes_nothing(repo):
    vm = vm_id(1)
    disk = DiskModel(chunks=1, seed=2)
    disk.write_chunk(0, seed=20)
    backup(repo, vm, [disk])
    disk.write_chunk(0, seed=21)
    backup(repo, vm, [disk])
    run_prune(repo, RetentionPolicy(keep_last=1))
    before = chunk_set(repo)
    report = run_gc(repo, dry_run=True, margin=0)
    assert report["would_delete"] == 1 and chunk_set(repo) == before


def test_chunks_of_a_running_writer_are_spared_and_dead_writers_cleaned(repo):
    vm = vm_id(2)
    disk = DiskModel(chunks=2, seed=3)
    disk.write_chunk(0, seed=30)
    disk.write_chunk(1, seed=31)
    live = repo.begin_backup(vm)
    w = live.disk_writer(disk.vdi, disk.vdi, disk.size)
    w.put_chunk(0, disk.chunk(0))
    w.wait()  # durable but referenced by no index yet
    dead = repo.begin_backup(vm_id(3))
    wd = dead.disk_writer(disk.vdi, disk.vdi, disk.size)
    wd.put_chunk(1, disk.chunk(1))
    wd.commit()  # committed index, but its session dies before its JSON
    dead.lease._stop.set()
    wd.shutdown()
    repo.backend.delete(dead.lease.key)  # its lease is gone (expired and removed)
    report = run_gc(repo, margin=0)
    assert report["writers_live"] == 1
    assert chunk_key(repo.codec.digest(disk.chunk(0))) in chunk_set(repo)  # spared
    w.put_chunk(1, disk.chunk(1))
    key = w.commit()
    live.commit()
    assert restore(repo, key) == bytes(disk.data)


def test_damaged_index_stops_gc(repo):
    vm = vm_id(4)
    disk = DiskModel(chunks=1, seed=4)
    disk.write_chunk(0, seed=40)
    _, keys = backup(repo, vm, [disk])
    key = keys[disk.vdi]
    data = bytearray(repo.backend.get(key))
    data[-1] ^= 0xFF
    repo.backend.put(key, bytes(data))
    repo.backend.put("chunks/00/" + "00" * 31 + "01", b"orphan")
    before = chunk_set(repo)
    with pytest.raises(GcRefused, match="damaged index"):
        run_gc(repo, margin=0)
    assert chunk_set(repo) == before
    assert locks.current_exclusive(repo.backend, "gc") is None  # lease released


def _race_setup(repo):
    """VM A's old restore point holds chunk c; VM A's newer point does not. A writer for VM B
    starts and deduplicates against c through the cross-VM lookup."""
    a = DiskModel(chunks=1, tail=4096, seed=5)
    a.write_chunk(0, seed=50)
    a.write_chunk(1, seed=51)
    vm_a = vm_id(5)
    _, ka = backup(repo, vm_a, [a])
    a.write_chunk(0, seed=52)
    backup(repo, vm_a, [a], bases=ka)
    b = DiskModel(chunks=1, tail=4096, seed=6)
    b.write_chunk(0, seed=50)  # same content as A's old chunk 0: c
    b.write_chunk(1, seed=61)
    session = repo.begin_backup(vm_id(6))
    w = session.disk_writer(b.vdi, b.vdi, b.size)
    w.put_chunk(0, b.chunk(0))
    w.put_chunk(1, b.chunk(1))
    w.wait()
    assert w.stats.chunks_deduped_repo == 1
    run_prune(repo, RetentionPolicy(keep_last=1))  # the last index holding c is gone
    return session, w, b


def test_prune_then_gc_under_a_deduplicating_writer_is_caught_at_commit(repo):
    session, w, b = _race_setup(repo)
    assert run_gc(repo, margin=0)["chunks_deleted"] == 1  # c: unreferenced and old
    with pytest.raises(ChunksVanished) as info:
        w.commit()
    assert info.value.positions == [0]
    assert not [k for k in (i.key for i in repo.backend.list("backups/")) if "pending" in k]
    key = commit_with_retry(w, b)
    session.commit()
    assert restore(repo, key) == bytes(b.data)
    assert run_verify(repo)["ok"]


def test_without_the_commit_check_the_same_race_corrupts(repo, monkeypatch):
    """The race above is real: skip the writer's check and a committed index loses a chunk."""
    monkeypatch.setattr(BackupSession, "vanished_digests", lambda self, index: set())
    session, w, b = _race_setup(repo)
    run_gc(repo, margin=0)
    w.commit()
    session.commit()
    report = run_check(repo)
    assert not report["ok"] and len(report["missing_chunks"]) == 1
    assert list(report["affected_restore_points"]) == [session.id]


def test_writer_commit_waits_for_a_gc_run_that_published_its_digests(repo):
    session, w, b = _race_setup(repo)
    at_delete = threading.Event()
    go = threading.Event()

    def pause():
        at_delete.set()
        assert go.wait(30)

    gc_thread = threading.Thread(
        target=run_gc, args=(repo,), kwargs={"margin": 0, "hooks": {"before_delete": pause}}
    )
    gc_thread.start()
    assert at_delete.wait(30)  # GC published c and re-scanned before our pending index
    outcome = []

    def commit():
        try:
            outcome.append(w.commit())
        except ChunksVanished as exc:
            outcome.append(exc)

    t = threading.Thread(target=commit)
    t.start()
    t.join(0.5)
    assert t.is_alive()  # waiting for the GC run to end
    go.set()
    gc_thread.join(30)
    t.join(30)
    assert isinstance(outcome[0], ChunksVanished)
    key = commit_with_retry(w, b)
    session.commit()
    assert restore(repo, key) == bytes(b.data)


def test_index_committed_before_the_rescan_rescues_its_chunks(repo):
    session, w, b = _race_setup(repo)
    published = threading.Event()
    go = threading.Event()
    result = {}

    def pause():
        published.set()
        assert go.wait(30)

    def gc():
        result.update(run_gc(repo, margin=0, hooks={"published": pause}))

    gc_thread = threading.Thread(target=gc)
    gc_thread.start()
    assert published.wait(30)
    committed = []
    t = threading.Thread(target=lambda: committed.append(w.commit()))
    t.start()  # writes its pending index, sees the list, waits for the run
    deadline = time.monotonic() + 30
    while not any(i.key.endswith(".pending") for i in repo.backend.list("backups/")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    go.set()
    gc_thread.join(30)
    t.join(30)
    assert committed, "commit must succeed: GC's re-scan saw the pending index"
    assert result["rescued_by_new_indexes"] == 1 and result["chunks_deleted"] == 0
    session.commit()
    assert restore(repo, committed[0]) == bytes(b.data)


@pytest.mark.parametrize("where,seed,rounds", [("local", 1, 10), ("local", 2, 10), ("s3", 3, 5)])
def test_backups_prune_and_gc_racing(request, tmp_path, where, seed, rounds):
    """Writers (shared content across VMs, incrementals), prune and GC in threads, many rounds.
    Afterwards every restore point restores its model and verify is clean. On S3 too: real
    conditional writes for the leases and 1-second LastModified resolution."""
    from orchestrator.repo.backends import open_backend
    from orchestrator.repo.repository import Repository

    if where == "s3":
        from tests.fixtures.s3 import fast_retry

        backend = open_backend(request.getfixturevalue("s3_env").url, retry=fast_retry())
    else:
        backend = open_backend(tmp_path / "race")
    repo = Repository.init(backend)
    expected: dict[str, bytes] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        disks = {}
        bases: dict[str, dict[str, str]] = {}
        try:
            for _ in range(rounds):
                vm = vm_id(100 + n * 10 + rng.randrange(2))
                disk = disks.setdefault(vm, DiskModel(chunks=1, tail=8192, seed=n))
                for i in rng.sample(range(2), rng.randint(1, 2)):
                    disk.write_chunk(i, seed=rng.randrange(5))  # small pool: cross-VM dedup
                base = bases.get(vm) if rng.random() < 0.7 else None
                if base is None:
                    disk.changed = {0, 1}
                try:
                    rid, keys = backup(repo, vm, [disk], bases=base, pause=rng.random() / 20)
                except NotFound:
                    # the base restore point was pruned meanwhile: the job falls back to a full
                    disk.changed = {0, 1}
                    rid, keys = backup(repo, vm, [disk], pause=rng.random() / 20)
                bases[vm] = keys
                with lock:
                    for key in keys.values():
                        expected[key] = bytes(disk.data)
        except BaseException as exc:
            errors.append(exc)

    def pruner() -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                run_prune(repo, RetentionPolicy(keep_last=rng.randint(1, 2)))
            except BaseException as exc:
                errors.append(exc)
                return

    def collector() -> None:
        while not stop.is_set():
            try:
                run_gc(repo, margin=0, ttl=30)
            except locks.LeaseBusy:
                continue
            except BaseException as exc:
                errors.append(exc)
                return

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    others = [threading.Thread(target=pruner), threading.Thread(target=collector)]
    for t in writers + others:
        t.start()
    for t in writers:
        t.join(120)
    stop.set()
    for t in others:
        t.join(60)
    assert not errors, errors
    run_gc(repo, margin=0)  # one more sweep after everything settled
    points = repo.list_restore_points()
    assert points
    for p in points:
        for key in p.disks.values():
            assert restore(repo, key) == expected[key], key
    print("vanished during the race:", dict(VANISHED))
    report = run_verify(repo)
    assert report["ok"], {k: v for k, v in report.items() if k != "repo"}


def _after_the_clock_of(repo, prefix, suffix):
    """Return once the backend stamps a new object later than the newest `suffix` object under
    `prefix`. Writers order themselves after a GC run by the backend's mtimes, whose clock is
    coarse (a kernel tick for files, a second on S3): an equal stamp cannot say which came first,
    and the writer then rightly reads the list. Bounded."""
    marks = [i.mtime for i in repo.backend.list(prefix) if i.key.endswith(suffix)]
    assert marks
    for n in range(2000):
        key = f"probe/clock-{n}"
        repo.backend.put(key, b"")
        later = repo.backend.stat(key).mtime > max(marks)
        repo.backend.delete(key)
        if later:
            return
        time.sleep(0.005)
    raise AssertionError("the backend's clock did not move past the GC run's marker")


def test_writers_ignore_lists_of_runs_finished_before_they_started(repo):
    vm = vm_id(7)
    disk = DiskModel(chunks=1, seed=7)
    disk.write_chunk(0, seed=70)
    backup(repo, vm, [disk])
    disk.write_chunk(0, seed=71)
    backup(repo, vm, [disk])
    run_prune(repo, RetentionPolicy(keep_last=1))
    holder = repo.begin_backup(vm_id(8))  # keeps the run's list alive (started before it)
    assert run_gc(repo, margin=0)["chunks_deleted"] == 1
    assert any(i.key.endswith(".list") for i in repo.backend.list("locks/gc-deleted/"))
    _after_the_clock_of(repo, "locks/gc-deleted/", ".done")
    repo.backend.reset()
    disk.write_chunk(0, seed=72)
    backup(repo, vm, [disk])  # started after the run ended: does not need its list
    assert not [k for v, k in repo.backend.log if v == "get" and "gc-deleted" in k]
    holder.abort()
    run_gc(repo, margin=0)  # now no writer predates the old run: its list is removed
    assert not any(i.key.endswith(".list") for i in repo.backend.list("locks/gc-deleted/"))


def test_a_damaged_deletion_list_stops_commits_clearly(repo):
    vm = vm_id(9)
    disk = DiskModel(chunks=1, seed=9)
    disk.write_chunk(0, seed=90)
    session = repo.begin_backup(vm)
    repo.backend.put("locks/gc-deleted/x.list", b"garbage")
    w = session.disk_writer(disk.vdi, disk.vdi, disk.size)
    w.put_chunk(0, disk.chunk(0))
    with pytest.raises(RepoError, match="x.list: not a GC deletion list"):
        w.commit()  # never half-trusted: without the list, safety cannot be argued
    assert not list(repo.backend.list("backups/"))  # the pending index was removed
    session.abort()


def test_foreign_objects_are_ignored_by_gc_and_listing(repo):
    vm = vm_id(10)
    disk = DiskModel(chunks=1, seed=10)
    disk.write_chunk(0, seed=100)
    _, keys = backup(repo, vm, [disk])
    repo.backend.put("chunks/zz/not-a-digest", b"x")
    repo.backend.put("backups/README", b"x")
    repo.backend.put(f"backups/{vm}/notes.txt", b"x")
    report = run_gc(repo, margin=0)
    assert report["chunks_deleted"] == 0 and report["chunks_total"] == 1
    assert repo.backend.exists("chunks/zz/not-a-digest")  # not ours to delete
    assert [p.id for p in repo.list_restore_points()] == [repo.resolve("latest").id]
    assert restore(repo, keys[disk.vdi]) == bytes(disk.data)


def test_gc_that_cannot_keep_its_lease_deletes_nothing(repo, monkeypatch):
    """A GC whose heartbeat fails (backend unreachable for it, process stalled) stops before
    its delete batch once its lease lifetime is used up; the next run cleans up after it."""
    vm = vm_id(11)
    disk = DiskModel(chunks=1, seed=11)
    disk.write_chunk(0, seed=110)
    backup(repo, vm, [disk])
    disk.write_chunk(0, seed=111)
    backup(repo, vm, [disk])
    run_prune(repo, RetentionPolicy(keep_last=1))
    before = chunk_set(repo)

    def stall():
        def broken(self):
            raise RepoError("injected: lease refresh failed")

        monkeypatch.setattr(locks.Lease, "refresh", broken)
        time.sleep(0.7)  # longer than the lease's ttl: the heartbeat never got through

    with pytest.raises(locks.LeaseLost):
        run_gc(repo, margin=0, ttl=0.6, hooks={"before_delete": stall})
    assert chunk_set(repo) == before
    monkeypatch.undo()
    time.sleep(0.7)  # its lease expires for everyone else too
    report = run_gc(repo, margin=0)
    assert report["chunks_deleted"] == 1
    assert run_verify(repo)["ok"]
