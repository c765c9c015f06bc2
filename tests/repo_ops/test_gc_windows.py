"""GC against writers: exact interleavings of the steps, forced with hooks and barriers.

The racing test (test_gc.py::test_backups_prune_and_gc_racing) finds these windows by chance;
each test here pins one window down so that it fails every time if the window is open.
"""

from __future__ import annotations

import threading
import time
import uuid

from orchestrator.jobs.gc import run_gc
from orchestrator.jobs.prune import RetentionPolicy, run_prune
from orchestrator.jobs.verify import run_check, run_verify
from orchestrator.repo.catalog import index_key, pending_key
from orchestrator.repo.deletions import DELETIONS_PREFIX
from tests.repo_ops.helpers import DiskModel, backup, commit_with_retry, restore

WAIT = 30.0  # a barrier that is never released fails the test instead of hanging it


def vm_id(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def _two_old_chunks(repo):
    """VM A's old point holds chunk c, VM C's old point holds chunk e; their newer points hold
    neither. A writer for VM B deduplicates onto both through the cross-VM lookup."""
    vm_a, vm_c, vm_b = vm_id(20), vm_id(21), vm_id(22)
    for vm, seed in ((vm_a, 20), (vm_c, 21)):
        d = DiskModel(chunks=1, seed=seed)
        d.write_chunk(0, seed=seed * 10)
        _, keys = backup(repo, vm, [d])
        d.write_chunk(0, seed=seed * 10 + 1)
        backup(repo, vm, [d], bases=keys)
    if repo.url.startswith("s3://"):
        time.sleep(1.1)  # 1 s mtimes: c and e must be older than the writer's lease
    b = DiskModel(chunks=2, seed=22)
    b.write_chunk(0, seed=200)  # c
    b.write_chunk(1, seed=210)  # e
    session = repo.begin_backup(vm_b)
    w = session.disk_writer(b.vdi, b.vdi, b.size)
    w.put_chunk(0, b.chunk(0))
    w.put_chunk(1, b.chunk(1))
    w.wait()
    assert w.stats.chunks_deduped_repo == 2
    return vm_a, vm_c, session, w, b


def test_a_pending_index_rewritten_after_the_mark_is_read_again_by_the_rescan(any_repo):
    """The window the racing test once hit (a committed index lost a chunk on S3).

    1. The writer's first commit writes its pending index; GC run R1 lists it (G3).
    2. The writer's check finds a chunk (e) an earlier run deleted: it removes the pending
       index and raises ChunksVanished; R1 then reads the pending index (G4): gone.
    3. The writer puts e again and commits again: pending index, deletion lists checked
       (R1 has not published yet: nothing names c), then the final index...
    4. ...which it writes only after R1 published c and re-scanned (G7). The re-scan lists the
       rewritten pending index under a key it had already "seen" in G4: it must read it
       again, or R1 deletes c under a committed index.
    """
    repo = any_repo
    vm_a, vm_c, session, w, b = _two_old_chunks(repo)
    run_prune(repo, RetentionPolicy(keep_last=1), vm=vm_c)  # e: unreferenced
    assert run_gc(repo, margin=0)["chunks_deleted"] == 1  # R0 deletes e
    run_prune(repo, RetentionPolicy(keep_last=1), vm=vm_a)  # c: unreferenced now

    names = ("w_pending", "r1_scanned", "w_dropped", "r1_marked", "w_checked", "r1_rescanned")
    ev = {n: threading.Event() for n in names}
    pkey = pending_key(session.vm, b.vdi, session.time)
    ikey = index_key(session.vm, b.vdi, session.time)
    committed: list[object] = []

    def before_list(key: str) -> None:
        if key == DELETIONS_PREFIX and threading.current_thread() is writer:
            if not ev["w_pending"].is_set():  # first commit: pending index written
                ev["w_pending"].set()
                ev["r1_scanned"].wait(WAIT)

    def before_put(key: str) -> None:
        if key.startswith("chunks/") and not ev["w_dropped"].is_set():
            ev["w_dropped"].set()  # ChunksVanished: pending index removed, e put again
            ev["r1_marked"].wait(WAIT)
        elif key == ikey:
            ev["w_checked"].set()  # second commit checked the lists: final index next
            ev["r1_rescanned"].wait(WAIT)

    def scanned() -> None:
        ev["r1_scanned"].set()
        ev["w_dropped"].wait(WAIT)

    hooks = {
        "scanned": scanned,
        "marked": ev["r1_marked"].set,
        "before_publish": lambda: ev["w_checked"].wait(WAIT),
        "before_delete": ev["r1_rescanned"].set,
    }
    result: dict = {}

    def commit() -> None:
        try:
            committed.append(commit_with_retry(w, b))
        except BaseException as exc:  # reported by the asserts below
            committed.append(exc)

    repo.backend.before.update(list=before_list, put=before_put)
    writer = threading.Thread(target=commit)
    writer.start()
    assert ev["w_pending"].wait(WAIT)
    gc = threading.Thread(target=lambda: result.update(run_gc(repo, margin=0, hooks=hooks)))
    gc.start()
    writer.join(2 * WAIT)
    gc.join(2 * WAIT)
    repo.backend.before.clear()
    assert all(e.is_set() for e in ev.values()), [n for n, e in ev.items() if not e.is_set()]
    assert committed == [ikey] and not repo.backend.exists(pkey)
    session.commit()
    report = run_check(repo)
    assert report["ok"], report.get("missing_chunks")
    assert result["rescued_by_new_indexes"] == 1 and result["chunks_deleted"] == 0
    assert restore(repo, ikey) == bytes(b.data)
    assert run_verify(repo)["ok"]
