"""fastpath copy: restore points copied between repositories, incremental, resumable, verified."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid

import pytest

from orchestrator.jobs.copy import CopyOptions, copy_repository, parse_since
from orchestrator.jobs.gc import run_gc
from orchestrator.jobs.prune import RetentionPolicy
from orchestrator.jobs.verify import run_verify
from orchestrator.repo.backends import open_backend
from orchestrator.repo.codec import chunk_key
from orchestrator.repo.errors import RepoError
from orchestrator.repo.repository import Repository
from tests.fixtures.s3 import fast_retry
from tests.repo import crashpoints
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import CountingBackend, DiskModel, backup, restore

VM_A = str(uuid.UUID(int=0xA))
VM_B = str(uuid.UUID(int=0xB))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def populate(repo, points: int = 3, chunks: int = 3):
    """Two VMs sharing chunk 0; ``points`` incremental points each. Returns {id: {vdi: bytes}}."""
    expected = {}
    for vm, seed in ((VM_A, 1), (VM_B, 2)):
        disk = DiskModel(chunks=chunks, tail=4096, seed=seed)
        disk.write_chunk(0, seed=7)  # shared by both VMs
        for i in range(1, disk.count):
            disk.write_chunk(i, seed=seed * 100 + i)
        bases = None
        for n in range(points):
            if n:
                disk.write_chunk(n % disk.count, seed=seed * 1000 + n)
            rid, keys = backup(repo, vm, [disk], bases=bases)
            bases = keys
            expected[rid] = {disk.vdi: bytes(disk.data)}
    return expected


def assert_restores(repo, expected):
    points = {p.id: p for p in repo.list_restore_points()}
    assert set(points) == set(expected)
    for rid, disks in expected.items():
        for vdi, data in disks.items():
            assert restore(repo, points[rid].disks[vdi]) == data, rid


def test_copy_local_to_s3_and_back_restores_byte_identical(tmp_path, s3_env):
    src = Repository.init(tmp_path / "src")
    expected = populate(src)
    s3 = Repository.init(CountingBackend(open_backend(s3_env.url, retry=fast_retry())))
    report = copy_repository(src, s3)
    assert report["ok"] and report["points_copied"] == 6 and report["mode"] == "as-is"
    unique = run_verify(src)["chunks_referenced"]
    assert report["chunks_sent"] == unique  # each distinct chunk once, shared ones included
    assert_restores(s3, expected)
    assert run_verify(s3)["ok"]
    assert s3.config.id != src.config.id  # DST keeps its own identity
    doc = s3.read_metadata(s3.list_restore_points()[0])
    assert doc["copied_from"]["repository_id"] == src.config.id
    # incremental: nothing new, nothing sent, no chunk read
    s3.backend.reset()
    again = copy_repository(src, s3)
    assert again["points_copied"] == 0 and again["points_skipped"] == 6
    assert again["chunks_sent"] == 0 and s3.backend.count("put", "chunks") == 0
    # one new point in SRC: only its new chunk travels
    disk = DiskModel(chunks=3, tail=4096, seed=1)
    disk.data[:] = expected[max(k for k in expected if k.startswith(VM_A))][disk.vdi]
    disk.write_chunk(2, seed=4242)
    last = src.list_restore_points(VM_A)[-1]
    rid, _ = backup(src, VM_A, [disk], bases={disk.vdi: last.disks[disk.vdi]})
    expected[rid] = {disk.vdi: bytes(disk.data)}
    third = copy_repository(src, s3)
    assert third["points_copied"] == 1 and third["chunks_sent"] == 1
    # and back, into a fresh local repository
    back = Repository.init(tmp_path / "back")
    assert copy_repository(s3, back)["points_copied"] == 7
    assert_restores(back, expected)


def test_copy_to_an_encrypted_repository_reencodes_and_translates(tmp_path):
    src = Repository.init(tmp_path / "src", encrypt=True, passphrase=PASSPHRASE)
    expected = populate(src, points=2)
    other = Repository.init(tmp_path / "other", encrypt=True, passphrase="another one")
    report = copy_repository(src, other)
    assert report["mode"] == "re-encoded" and report["ok"]
    assert_restores(other, expected)
    assert run_verify(other)["ok"]
    # no chunk object of one is a chunk of the other: digests are keyed per repository
    a = {i.key for i in src.backend.list("chunks/")}
    b = {i.key for i in other.backend.list("chunks/")}
    assert a and b and not a & b
    plain = Repository.init(tmp_path / "plain")
    assert copy_repository(other, plain)["mode"] == "re-encoded"
    assert_restores(plain, expected)
    # same keys: ciphertext as is (a byte-for-byte copy of the config and keys makes a twin)
    twin_dir = tmp_path / "twin"
    (twin_dir / "keys").mkdir(parents=True)
    for rel in ["config"] + [f"keys/{k}" for k in os.listdir(tmp_path / "src" / "keys")]:
        (twin_dir / rel).write_bytes((tmp_path / "src" / rel).read_bytes())
    twin = Repository.open(twin_dir, passphrase=PASSPHRASE)
    r = copy_repository(src, twin)
    assert r["mode"] == "as-is"
    for info in twin.backend.list("chunks/"):
        assert twin.backend.get(info.key) == src.backend.get(info.key)


def test_copy_filters_vm_since_and_prunes_dst_only(tmp_path):
    src = Repository.init(tmp_path / "src")
    populate(src, points=3)
    dst = Repository.init(tmp_path / "dst")
    r = copy_repository(src, dst, CopyOptions(vms=[VM_B]))
    assert r["points_copied"] == 3 and {p.vm for p in dst.list_restore_points()} == {VM_B}
    newest_a = src.list_restore_points(VM_A)[-1]
    r = copy_repository(src, dst, CopyOptions(vms=[VM_A], since=newest_a.timestamp))
    assert r["copied"] == [newest_a.id]
    r = copy_repository(src, dst, CopyOptions(policy=RetentionPolicy(keep_last=1)))
    assert r["points_copied"] == 2  # the two older points of A
    assert len(r["pruned"]) == 4 and len(dst.list_restore_points()) == 2
    assert len(src.list_restore_points()) == 6  # SRC untouched
    assert run_gc(dst)["ok"] and run_verify(dst)["ok"]  # GC sees the copied points
    assert parse_since("2d", now=1_000_000.0) == 1_000_000.0 - 2 * 86400
    assert parse_since("2026-12-01") == parse_since("20261201T000000.000000Z")
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


def test_copy_refuses_a_chunk_damaged_in_src_and_copies_the_rest(tmp_path):
    src = Repository.init(tmp_path / "src")
    expected = populate(src, points=1)
    a = src.list_restore_points(VM_A)[0]
    only_a = src.read_index(a.disks[next(iter(a.disks))]).get(1)
    data = bytearray(src.backend.get(chunk_key(only_a)))
    data[-3] ^= 0x40
    src.backend.put(chunk_key(only_a), bytes(data))
    dst = Repository.init(tmp_path / "dst")
    r = copy_repository(src, dst)
    assert not r["ok"] and [f["id"] for f in r["failed"]] == [a.id]
    assert "digest" in r["failed"][0]["error"] or "zstd" in r["failed"][0]["error"]
    assert [p.id for p in dst.list_restore_points()] == [k for k in expected if k != a.id]
    assert not dst.backend.exists(chunk_key(only_a))
    with pytest.raises(RepoError, match="same repository"):
        copy_repository(src, Repository.open(tmp_path / "src"))


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _progress(backend) -> int:
    """Objects a copy has made durable in DST: chunks, final indexes, restore points."""
    keys = [i.key for i in backend.list("chunks/")] + [i.key for i in backend.list("backups/")]
    return sum(1 for k in keys if not k.endswith(".pending"))


# ``fastpath copy`` (its CLI main) in a child that stops right after its n-th store of an object
# _progress counts (a chunk, a final index, a restore point document)
COPY_KILLED_AFTER = r"""
import sys
from orchestrator.cli import main
from orchestrator.repo.backends.s3 import S3Backend
from tests.repo.crashpoints import arm_after_call
def counted(key, data):
    return key.startswith("chunks/") or key.startswith("backups/") and not key.endswith(".pending")
arm_after_call(S3Backend, "put", int(sys.argv[1]), counted)
print("ready", flush=True)
sys.exit(main(sys.argv[2:]))
"""


def test_killed_copies_resume_and_complete(tmp_path, s3_env):
    """kill -9 of ``fastpath copy`` children at random points of their progress (right after a
    random count of objects stored in DST: the child stops itself there, see
    tests/repo/crashpoints.py, so the kill lands mid-way however loaded the machine), 20 trials,
    each resuming the last; then one to the end."""
    src = Repository.init(tmp_path / "src")
    expected = populate(src, points=8, chunks=6)
    unique = run_verify(src)["chunks_referenced"]
    total = unique + 2 * len(expected)  # chunks + one index and one document per point
    Repository.init(s3_env.url, retry=fast_retry()).close()
    watch = open_backend(s3_env.url, retry=fast_retry())
    rng = random.Random(14)
    trials = 20
    states = []
    for trial in range(trials):
        done = _progress(watch)
        if done >= total:
            break
        # spread the kills over the whole copy: each trial lets a random share of what is left
        # of its slice be stored, then kills the copy
        step = max(1, (total - done - 1) // (trials - trial))
        stores = rng.randint(1, step)
        args = ("copy", tmp_path / "src", s3_env.url, "--json", "--concurrency", "1")
        proc = crashpoints.spawn(COPY_KILLED_AFTER, stores, *args)
        assert crashpoints.kill_at_point(proc) == f"put {stores}"
        states.append(_progress(watch))
        # killed right after its last allowed store (a resumed copy may store again an index
        # or document a killed one stored, so not every store is new)
        assert done <= states[-1] <= done + stores, (total, states)
    mid_way = [n for n in states if 0 < n < total]
    print("copy kills: %d objects, progress after each kill: %s" % (total, states))
    assert len(mid_way) >= 15, (total, states)  # the kills landed mid-way, not after the end
    stored = sum(1 for _ in watch.list("chunks/"))
    final = _cli("copy", str(tmp_path / "src"), s3_env.url, "--json")
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()
    report = json.loads(out)
    # what the killed runs stored was not sent again
    assert report["chunks_sent"] == unique - stored
    dst = Repository.open(s3_env.url, retry=fast_retry())
    assert_restores(dst, expected)
    assert run_verify(dst)["ok"]
    again = json.loads(_cli("copy", str(tmp_path / "src"), s3_env.url, "--json").communicate()[0])
    assert again["points_copied"] == 0 and again["chunks_sent"] == 0
    watch.close()
