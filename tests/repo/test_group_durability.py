"""Group durability of the local backend (stage -> publish) and of the backup writer using it.

What must hold (issue 5, DESIGN.md Formats → Repository): a final name only ever names a complete
file that was fsynced before the rename; every touched directory is fsynced before ``publish``
returns; an index (pending or final) is written only after every chunk it names is durable under
its final name, including chunks another disk of the same session staged; a failed batch fails
the commits, and nothing staged is left behind. A writer killed with SIGKILL in the middle of
batched backups leaves no torn chunk under a final name and no committed index naming a missing
chunk.
"""

from __future__ import annotations

import os
import random
import time
import uuid

import pytest

from orchestrator.repo.backends import local as local_mod
from orchestrator.repo.backends.local import TMP_PREFIX, LocalBackend
from orchestrator.repo.codec import CHUNK_SIZE, ZERO_DIGEST, chunk_key
from orchestrator.repo.errors import BackendError, RepoError
from orchestrator.repo.repository import Repository
from tests.repo import crashpoints
from tests.repo_ops.helpers import chunk_bytes

VM = "11111111-2222-3333-4444-555555555555"


def temps(root) -> list[str]:
    return [f for _d, _s, files in os.walk(root) for f in files if f.startswith(TMP_PREFIX)]


class SyscallLog:
    """Records fsync (by path of the fd) and rename calls made by the local backend."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            real_fsync(fd)
            self.events.append(("fsync", path))

        def replace(src, dst):
            real_replace(src, dst)
            self.events.append(("rename", os.fspath(dst), os.fspath(src)))

        monkeypatch.setattr(local_mod.os, "fsync", fsync)
        monkeypatch.setattr(local_mod.os, "replace", replace)

    def index(self, kind: str, path: str) -> int:
        for k, e in enumerate(self.events):
            if e[0] == kind and e[1] == path:
                return k
        raise AssertionError(f"no {kind} of {path} in {self.events}")


def test_publish_fsyncs_each_file_before_its_rename_and_each_directory_once(tmp_path, monkeypatch):
    b = LocalBackend(tmp_path)
    keys = [f"chunks/{d}/obj{k}" for d in ("aa", "bb") for k in range(3)]
    staged = [b.stage(key, key.encode() * 1000) for key in keys]
    assert {i.key for i in b.list()} == set()  # staged objects are invisible
    log = SyscallLog(monkeypatch)
    b.publish(staged)
    for obj in staged:
        fsynced = log.index("fsync", obj.tmp)
        renamed = log.index("rename", obj.path)
        assert fsynced < renamed, f"{obj.key} renamed before its fsync"
    last_rename = max(k for k, e in enumerate(log.events) if e[0] == "rename")
    dirs = [e[1] for e in log.events if e[0] == "fsync" and os.path.isdir(e[1])]
    # each touched directory and its ancestors (made while staging, not yet fsynced), once
    expected = {str(tmp_path / "chunks" / d) for d in ("aa", "bb")}
    assert sorted(dirs) == sorted(expected | {str(tmp_path / "chunks"), str(tmp_path)})
    for d in dirs:
        assert log.index("fsync", d) > last_rename
    assert {b.get(key) for key in keys} == {key.encode() * 1000 for key in keys}
    assert temps(tmp_path) == []
    b.close()


def test_publish_failed_fsync_renames_nothing_and_leaves_no_temporary(tmp_path, monkeypatch):
    b = LocalBackend(tmp_path)
    staged = [b.stage(f"chunks/cc/obj{k}", b"x" * 4096) for k in range(4)]
    bad = staged[2].tmp
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == bad:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(local_mod.os, "fsync", fsync)
    with pytest.raises(BackendError, match="chunks/cc/obj2"):
        b.publish(staged)
    assert list(b.list()) == []
    assert temps(tmp_path) == []
    b.close()


def test_discard_removes_staged_objects(tmp_path):
    b = LocalBackend(tmp_path)
    staged = [b.stage(f"chunks/dd/obj{k}", b"y" * 100) for k in range(3)]
    assert len(temps(tmp_path)) == 3
    b.discard(staged)
    assert temps(tmp_path) == [] and list(b.list()) == []


def _spy_repo(tmp_path, monkeypatch, batch):
    """A local repository whose writer batches ``batch`` chunks, with a check at every index
    write that each chunk it names is durable (published: fsynced, renamed, dir fsynced)."""
    repo = Repository.init(tmp_path / "repo")
    backend = repo.backend
    assert type(backend) is LocalBackend
    durable: set[str] = set()
    checked: list[str] = []
    real_publish, real_put = backend.publish, backend.put

    def publish(staged):
        real_publish(staged)
        durable.update(obj.key for obj in staged)

    def put(key, data):
        if key.endswith((".pending", ".index")):
            from orchestrator.repo.index import Index

            for digest in Index.decode(data, key).digests():
                if digest != ZERO_DIGEST:
                    ck = chunk_key(digest)
                    assert ck in durable, f"{key} written before {ck} was durable"
                    assert backend.exists(ck)
            checked.append(key)
        real_put(key, data)

    monkeypatch.setattr(backend, "publish", publish)
    monkeypatch.setattr(backend, "put", put)
    return repo, durable, checked


def test_writer_commits_index_only_after_its_chunks_are_durable(tmp_path, monkeypatch):
    repo, durable, checked = _spy_repo(tmp_path, monkeypatch, batch=3)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    shared = chunk_bytes(77)
    with repo.begin_backup(VM) as s:
        s.durable.batch_size = 3
        wa = s.disk_writer(a, a, 8 * CHUNK_SIZE)
        wb = s.disk_writer(b, b, 2 * CHUNK_SIZE)
        for i in range(7):
            wa.put_chunk(i, chunk_bytes(i))  # two full batches published while putting
        wa.put_chunk(7, shared)  # staged by disk A, batch not full
        while wa._futures:
            time.sleep(0.01)
        wb.put_chunk(0, shared)  # deduplicated against A's staged chunk
        wb.put_chunk(1, bytes(CHUNK_SIZE))
        kb = wb.commit()  # B commits first: must publish A's staged chunk
        ka = wa.commit()
        s.commit()
    assert wb.stats.chunks_deduped == 1 and wb.stats.chunks_new == 0
    assert len(checked) == 4  # pending + final index of both disks, each checked
    assert len(durable) == 8
    assert temps(tmp_path) == []
    for key, n in ((ka, 8), (kb, 2)):
        idx = repo.read_index(key)
        assert len(list(repo.iter_disk(idx))) == n
    assert b"".join(repo.iter_disk(repo.read_index(kb))) == shared + bytes(CHUNK_SIZE)
    repo.close()


def test_failed_batch_fails_commit_and_leaves_nothing(tmp_path, monkeypatch):
    repo = Repository.init(tmp_path / "repo")
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(path).startswith(TMP_PREFIX) and "/chunks/" in path:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(local_mod.os, "fsync", fsync)
    vdi = str(uuid.uuid4())
    with pytest.raises(RepoError, match="No space left"):
        with repo.begin_backup(VM) as s:
            s.durable.batch_size = 2
            w = s.disk_writer(vdi, vdi, 5 * CHUNK_SIZE)
            for i in range(5):
                w.put_chunk(i, chunk_bytes(500 + i))
            w.commit()
            s.commit()
    keys = {i.key for i in repo.backend.list()}
    assert not any(k.endswith((".index", ".pending", ".json")) for k in keys)
    assert temps(tmp_path) == []
    repo.close()


DRIVER = r"""
import sys, uuid
from orchestrator.repo.codec import CHUNK_SIZE
from orchestrator.repo.repository import Repository
from tests.repo.crashpoints import arm
from tests.repo_ops.helpers import chunk_bytes
root, seed, point, nth = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if point != "random":
    arm(point, nth, "/chunks/")
repo = Repository.open(root)
vm = "11111111-2222-3333-4444-555555555555"
n = 0
print("ready", flush=True)
while point == "random" or n < 4:  # an armed point is reached in the first 2 sessions
    vdi = str(uuid.uuid4())
    with repo.begin_backup(vm) as s:
        s.durable.batch_size = 3
        w = s.disk_writer(vdi, vdi, 7 * CHUNK_SIZE, concurrency=4)
        for i in range(7):
            w.put_chunk(i, chunk_bytes(seed * 100_000 + n * 10 + i))
        w.commit()
        s.commit({"n": n})
    n += 1
sys.exit("kill point %s %d never reached" % (point, nth))
"""

# Each session of DRIVER stages 7 new chunks with batches of 3: publish #1 (chunks 0-2) and #2
# (3-5) while putting, #3 (chunk 6) by the commit's flush just before the index is written;
# renames 1-7 and writes 1-7 are session 1's, publish #4-#6, renames/writes 8-14 session 2's.
# (point, n, whether the kill leaves staged objects behind: the staged-not-published window)
KILL_POINTS = [
    ("mid-write", 2, True),  # a chunk half written (session 1)
    ("mid-write", 9, True),  # ... in session 2, after a committed restore point
    ("publish-start", 1, True),  # first batch staged, nothing fsynced or renamed
    ("publish-start", 3, True),  # the commit's flush: its index is next
    ("publish-start", 5, True),  # session 2, after a committed restore point
    ("after-rename", 2, True),  # batch half renamed, directories not fsynced
    ("after-rename", 7, False),  # the commit's flush renamed, its index not yet written
    ("publish-end", 3, False),  # every chunk durable, its index not yet written
    ("publish-end", 4, False),  # session 2: one batch durable, rest not staged
]
RANDOM_KILLS = 5


def check_after_kill(root) -> int:
    """Every chunk under a final name decodes and matches its digest, and every index, pending
    or final, names only such chunks (restores in full); returns the committed indexes."""
    repo = Repository.open(root)
    try:
        for info in repo.backend.list("chunks/"):
            digest = bytes.fromhex(info.key.rsplit("/", 1)[1])
            repo.read_chunk(digest)  # raises on a torn or foreign object
        catalog = repo.scan()
        for key in catalog.indexes + [k for k, _vm, _time in catalog.pending]:
            blocks = list(repo.iter_disk(repo.read_index(key)))  # raises on a missing chunk
            assert len(blocks) == 7 and all(len(b) == CHUNK_SIZE for b in blocks), key
        return len(catalog.indexes)
    finally:
        repo.close()


def test_sigkill_during_batched_backups_never_tears_or_dangles(tmp_path):
    """kill -9 of batched backups, exactly at chosen points of staging and publishing (the child
    stops itself there and reports, see tests/repo/crashpoints.py) and at random instants: every
    chunk under a final name decodes and matches its digest, every index (pending or final)
    restores, and only .tmp- names are left over.

    The chosen points make the test deterministic and keep it able to fail: a writer that
    staged in place (under the final name) leaves a torn chunk at the mid-write kills, which
    ``read_chunk`` rejects; a writer that wrote an index before publishing (all of) its chunks,
    e.g. a commit not flushing the session's staged batch first, leaves at the publish-start #3
    kill an index naming a chunk that exists only as a .tmp- file, which ``iter_disk`` rejects.
    The window assertion (staged objects left behind) is checked per kill point, so it holds by
    construction instead of by luck. What kill -9 cannot show is a missing fsync (the page cache
    survives it): the fsync-before-rename and directory-fsync order is the SyscallLog tests'."""
    rng = random.Random(7)
    root = tmp_path / "repo"
    Repository.init(root).close()
    trials = [(p, n, w) for p, n, w in KILL_POINTS] + [("random", 0, None)] * RANDOM_KILLS
    committed = 0
    for seed, (point, nth, window) in enumerate(trials, 1):
        proc = crashpoints.spawn(DRIVER, root, seed, point, nth)
        if point == "random":
            crashpoints.kill_after(proc, rng.uniform(0.05, 0.6))
        else:
            assert crashpoints.kill_at_point(proc) == f"{point} {nth}"
        committed = check_after_kill(root)
        left = len(temps(root))
        if window:
            assert left > 0, f"kill at {point} {nth} left nothing staged"
        print(f"kill at {point} {nth}: {left} staged left, {committed} indexes committed")
        # clear the temporaries, so the next trial's window assertion sees only its own
        LocalBackend(root).remove_stale_temporaries(older_than=-1)
    assert committed > 0  # the indexes checked were not all vacuous
