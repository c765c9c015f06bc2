"""Leases of processes killed with kill -9 on this machine are dead at once, not after their ttl.

Real child processes (tests/repo_ops/lease_holder.py) take a writer lease, the GC lease, or stop
a GC run after publishing its deletion list; the test kills them and checks that the next
backup, GC or commit goes on without waiting for the 300 s expiry, and that a holder that may
still run (another machine) is waited for with a message saying who and for how long.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from orchestrator.cliutil import CommandFailed
from orchestrator.jobs.backup.vm import _refuse_concurrent
from orchestrator.jobs.gc import run_gc
from orchestrator.jobs.prune import RetentionPolicy, live_sessions, run_prune
from orchestrator.jobs.verify import run_verify
from orchestrator.repo import locks
from orchestrator.repo.errors import RepoError
from orchestrator.repo.repository import Repository
from tests.repo_ops.helpers import DiskModel, backup, restore
from tests.repo_ops.test_cli import as_json, fastpath


def vm_id(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def start_holder(path, *args) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.repo_ops.lease_holder", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.poll() is not None else line
    return proc


def kill_keep_zombie(proc: subprocess.Popen) -> None:
    """SIGKILL and wait until it has exited, without reaping it: it stays a zombie."""
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)


@pytest.fixture
def local_repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    yield repo
    repo.close()


def test_a_killed_backups_lease_is_dead_at_once(local_repo):
    repo = local_repo
    vm = vm_id(30)
    proc = start_holder(repo.url, "writer", vm)
    try:
        (held,) = locks.list_writer_leases(repo.backend)
        assert not held.expired() and held.body["pid"] == proc.pid
        assert held.body["pid_start"] and held.body["boot"] and held.body["pidns"]
        session = repo.begin_backup(vm)
        with pytest.raises(CommandFailed, match=rf"pid {proc.pid} \(.*lease_holder.*expires in"):
            _refuse_concurrent(repo, session, vm)  # `backup vm` of the same VM: refused
        kill_keep_zombie(proc)
        (held,) = [w for w in locks.list_writer_leases(repo.backend) if w.key != session.lease.key]
        assert held.expired() and "has exited" in held.dead_reason()  # a zombie
    finally:
        proc.kill()
        proc.wait(30)
    (held,) = [w for w in locks.list_writer_leases(repo.backend) if w.key != session.lease.key]
    assert held.expired() and "is gone" in held.dead_reason()
    _refuse_concurrent(repo, session, vm)  # the next backup of that VM goes on at once
    assert (vm, held.body["info"]["time"]) not in live_sessions(repo)
    assert run_gc(repo, margin=0)["writers_live"] == 1  # ours only; the dead lease is removed
    assert [w.key for w in locks.list_writer_leases(repo.backend)] == [session.lease.key]
    session.abort()


def test_gc_after_a_killed_gc_runs_at_once(local_repo):
    repo = local_repo
    proc = start_holder(repo.url, "gc")
    try:
        with pytest.raises(locks.LeaseBusy, match=rf"pid {proc.pid} \(.*lease_holder.*expires in"):
            locks.acquire_exclusive(repo.backend, "gc", heartbeat=False)
        gc = as_json(fastpath("gc", repo.url, "--json"))
        assert not gc["ok"] and f"pid {proc.pid}" in gc["error"]  # one line naming the holder
    finally:
        proc.kill()
        proc.wait(30)
    done = fastpath("gc", repo.url, "--json")
    assert done.returncode == 0 and as_json(done)["ok"], done.stderr


def _published_by_a_killed_gc(repo, tmp_path, vm_n: int):
    """A writer deduplicated onto chunk c; prune removed the last index holding c; a GC run
    (another process) published c in its deletion list and was killed before deleting."""
    a = DiskModel(chunks=1, seed=vm_n)
    a.write_chunk(0, seed=vm_n * 10)
    _, ka = backup(repo, vm_id(vm_n), [a])
    a.write_chunk(0, seed=vm_n * 10 + 1)
    backup(repo, vm_id(vm_n), [a], bases=ka)
    b = DiskModel(chunks=1, seed=vm_n + 1)
    b.write_chunk(0, seed=vm_n * 10)  # c
    said: list[str] = []
    session = repo.begin_backup(vm_id(vm_n + 1), gc_wait=20, on_wait=said.append)
    w = session.disk_writer(b.vdi, b.vdi, b.size)
    w.put_chunk(0, b.chunk(0))
    w.wait()
    assert w.stats.chunks_deduped_repo == 1
    run_prune(repo, RetentionPolicy(keep_last=1))
    proc = start_holder(repo.url, "gc-run")
    proc.kill()
    proc.wait(30)
    (lst,) = [i.key for i in repo.backend.list("locks/gc-deleted/") if i.key.endswith(".list")]
    return session, w, b, said, lst


def test_a_backup_after_a_killed_gc_run_commits_at_once(local_repo, tmp_path):
    repo = local_repo
    session, w, b, said, _ = _published_by_a_killed_gc(repo, tmp_path, 40)
    key = w.commit()  # the run's lease names a dead pid: no wait (gc_wait would raise)
    session.commit()
    assert said == []
    assert restore(repo, key) == bytes(b.data)
    assert run_verify(repo)["ok"]


def test_a_writer_waiting_for_a_gc_run_elsewhere_says_who_and_how_long(local_repo, tmp_path):
    repo = local_repo
    session, w, b, said, lst = _published_by_a_killed_gc(repo, tmp_path, 50)
    session.gc_wait = 0.5
    (gen,) = [i.key for i in repo.backend.list("locks/gc/")]
    body = json.loads(repo.backend.get(gen))
    body["host"] = "backup-2.example"  # the same run, but on another machine: it may be alive
    repo.backend.put(gen, json.dumps(body).encode())
    with pytest.raises(
        RepoError, match=r"GC run .* \(host backup-2.example pid \d+ .*still running"
    ):
        w.commit()
    assert said and "waiting for GC run" in said[0] and "host backup-2.example" in said[0]
    assert "lease_holder" in said[0] and "expires in" in said[0] and "waited" in said[0]
    repo.backend.delete(gen)  # that run ends (its lease is gone): the commit goes on
    session.gc_wait = None
    key = w.commit()
    session.commit()
    assert restore(repo, key) == bytes(b.data)


def test_pid_reuse_other_machines_and_old_bodies(monkeypatch):
    me = locks.holder_identity()
    assert locks.holder_gone(me) is None  # this process runs
    assert "another process" in locks.holder_gone({**me, "pid_start": me["pid_start"] + 1})
    assert "is gone" in locks.holder_gone({**me, "pid": 2**22 + 12345})  # above pid_max
    for other in ({"host": "elsewhere"}, {"boot": "0" * 36}, {"pidns": "pid:[1]"}):
        assert locks.holder_gone({**me, "pid": 2**22 + 12345, **other}) is None
    # a live process whose /proc entry is hidden (hidepid, another user): never judged dead
    with monkeypatch.context() as m:
        m.setattr(locks, "process_start", lambda pid: None)
        assert locks.holder_gone({**me, "pid_start": me["pid_start"] + 1}) is None
    old = {k: me[k] for k in ("host", "pid")} | {"pid": 2**22 + 12345}
    assert locks.holder_gone(old) is None  # a lease written before these fields: the ttl decides


def test_the_recorded_command_hides_secret_options(monkeypatch):
    argv = ["fastpath", "backup", "vm", "X", "--password", "hunter2", "--token=abc", "--repo", "r"]
    monkeypatch.setattr(sys, "argv", argv)
    cmd = locks.holder_identity()["cmd"]
    assert "hunter2" not in cmd and "abc" not in cmd
    assert cmd == "fastpath backup vm X --password *** --token=*** --repo r"
