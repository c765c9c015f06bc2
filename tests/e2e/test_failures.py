"""Failure paths of `fastpath backup vm`: whatever breaks, nothing half-done is committed, the
snapshot is cleaned up, the message says what failed, and the next backup works."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT, fastpath, qemu_raw


def repo_objects(repo):
    out = []
    for dirpath, _dirs, files in os.walk(os.path.join(repo, "backups")):
        out += [os.path.join(dirpath, f) for f in files]
    return sorted(out)


def test_agent_down_mid_backup_retries_then_fails_cleanly(own_sim, repo_factory, monkeypatch):
    """The agent stops answering once the export is open (SIGSTOP: its sockets stay open, so
    only timeouts can tell): reconnects are tried, then one clear failure; no index, no
    snapshot left. Once the agent is back, the next backup works."""
    from orchestrator.jobs.backup import vm as backup_vm
    from orchestrator.sources.agent_nbd import AgentNbdSource

    sim = own_sim
    repo = repo_factory("local")
    pid = sim.agent_pid()
    orig_open = AgentNbdSource.open
    orig_close = backup_vm.close_sources

    def open_then_hang(self, blocks=None):
        plan = orig_open(self, blocks)
        os.kill(pid, signal.SIGSTOP)
        return plan

    def close_and_resume(*a, **kw):
        os.kill(pid, signal.SIGCONT)
        return orig_close(*a, **kw)

    monkeypatch.setattr(AgentNbdSource, "open", open_then_hang)
    monkeypatch.setattr(backup_vm, "close_sources", close_and_resume)
    vm = sim.vm(0)
    args = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
    try:
        r = fastpath(*args, "--retries", "1", "--io-timeout", "1", expect=1)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "gave up after 1 retries" in r["error"], r
    assert "no answer for 1 s" in r["error"] or "handshake" in r["error"], r
    assert repo_objects(repo) == []
    assert sim.fastpath_snapshots(vm) == []
    monkeypatch.undo()
    r = fastpath(*args)
    assert not r["disks"][0]["incremental"]


@pytest.fixture(scope="module")
def msim(sim):
    return sim


def test_snapshot_left_behind_is_cleaned(msim, repo_factory):
    sim = msim
    repo = repo_factory("local")
    vm = sim.vm(0)
    from orchestrator.jobs.backup import snapshot_tag
    from orchestrator.repo.repository import Repository

    with Repository.open(repo) as opened:
        tag = snapshot_tag(opened)
    vm_ref = sim.x.VM.get_by_uuid(vm)
    before = set(sim.fastpath_snapshots(vm))
    leftover = sim.x.VM.snapshot(vm_ref, f"{tag}2026-01-01T00:00:00Z")
    # another repository's snapshot of the same VM is not ours to clean
    other = sim.x.VM.snapshot(vm_ref, "[fastpath 0123456789ab] 2026-01-01T00:00:00Z")
    leftover_uuid = sim.x.VM.get_uuid(leftover)
    assert leftover_uuid in sim.fastpath_snapshots(vm)
    r = fastpath("backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd")
    after = set(sim.fastpath_snapshots(vm))
    assert after == before | {r["snapshot"], sim.x.VM.get_uuid(other)}
    assert "left behind" in r["_stderr"]


def test_vm_deleted_during_backup(msim, repo_factory, monkeypatch, tmp_path):
    """The snapshot holds the data: the backup completes and restores to the snapshot's content."""
    import XenAPI

    from orchestrator.repo.writer import DiskWriter

    sim = msim
    repo = repo_factory("local")
    vm = sim.vm(1)
    orig = DiskWriter.put_chunk
    done = []

    def put(self, i, data):
        if not done:
            done.append(True)
            s = XenAPI.Session(sim.url)
            s.xenapi.login_with_password("root", "hostsim", "2.21", "deleter")
            ref = s.xenapi.VM.get_by_uuid(vm)
            s.xenapi.VM.hard_shutdown(ref)
            s.xenapi.VM.destroy(ref)
            s.xenapi.session.logout()
        return orig(self, i, data)

    monkeypatch.setattr(DiskWriter, "put_chunk", put)
    r = fastpath("backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd")
    assert done
    with pytest.raises(XenAPI.Failure):
        sim.x.VM.get_by_uuid(vm)
    (d,) = r["disks"]
    expected = sim.export_raw(d["snapshot_vdi"])
    out = tmp_path / "restored.vhd"
    fastpath("restore", repo, r["id"], "-o", out)
    assert qemu_raw(out, tmp_path)[: len(expected)] == expected


def test_repository_full(msim, repo_factory, monkeypatch):
    from orchestrator.repo.backends.local import LocalBackend

    sim = msim
    repo = repo_factory("local")
    vm = sim.vm(2)
    orig = LocalBackend._write_temp
    puts = []

    def write_temp(self, path, data):
        if "/chunks/" in str(path):
            puts.append(path)
            if len(puts) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(self, path, data)

    monkeypatch.setattr(LocalBackend, "_write_temp", write_temp)
    args = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
    before = set(sim.fastpath_snapshots(vm))
    r = fastpath(*args, expect=1)
    assert "No space left on device" in r["error"], r
    assert repo_objects(repo) == []
    assert set(sim.fastpath_snapshots(vm)) == before
    monkeypatch.undo()
    r = fastpath(*args)
    fastpath("verify", repo)


def test_s3_faults_through_the_fault_proxy(msim, s3_env, fault_proxy, monkeypatch, tmp_path):
    sim = msim
    vm = sim.vm(3)
    fastpath("repo", "init", s3_env.url)
    fault_proxy.configure(rate=0.25)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.url)
    r = fastpath(
        "backup", "vm", vm, "--hostsim", sim.root, "--repo", s3_env.url, "--transport", "nbd"
    )
    faults = sum(fault_proxy.count(k) for k in ("500", "503", "slowdown", "reset_before"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    (d,) = r["disks"]
    expected = sim.export_raw(d["snapshot_vdi"])
    out = tmp_path / "restored.raw"
    fastpath("restore", s3_env.url, r["id"], "-o", out)
    assert out.read_bytes() == expected
    fastpath("verify", s3_env.url)
    assert faults + fault_proxy.count("truncate") + fault_proxy.count("reset_after") > 0


INTERRUPT = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
from orchestrator.repo.writer import DiskWriter
orig = DiskWriter.put_chunk
calls = []
def put(self, i, data):
    calls.append(i)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return orig(self, i, data)
DiskWriter.put_chunk = put
from orchestrator.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_leaves_repository_and_pool_clean(msim, repo_factory):
    sim = msim
    repo = repo_factory("local")
    vm = sim.vm(0)
    before = sim.fastpath_snapshots(vm)
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPT.format(root=ROOT)]
        + ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr
    assert repo_objects(repo) == []
    assert sim.fastpath_snapshots(vm) == before
    fastpath("check", repo)


def test_concurrent_backup_of_the_same_vm_is_refused(msim, repo_factory):
    """A live writer lease of the same VM (another run) makes a second run refuse, before it
    touches any snapshot (the other run's snapshot would look like a leftover)."""
    from orchestrator.repo import locks
    from orchestrator.repo.backends import open_backend

    sim = msim
    repo = repo_factory("local")
    vm = sim.vm(2)
    backend = open_backend(repo)
    lease = locks.acquire_writer_lease(
        backend, f"{vm}.other", info={"vm": vm, "time": "now"}, heartbeat=False
    )
    before = set(sim.fastpath_snapshots(vm))
    try:
        args = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
        r = fastpath(*args, expect=1)
        assert "another backup of VM" in r["error"], r
        assert set(sim.fastpath_snapshots(vm)) == before
    finally:
        lease.release()
        backend.close()
    fastpath(*args)


STALL = r"""
import sys, time
sys.path.insert(0, {root!r})
from orchestrator.repo.writer import DiskWriter
def put(self, i, data):
    print("reading", flush=True)  # the new snapshot exists, data is flowing: kill me here
    time.sleep(3600)
DiskWriter.put_chunk = put
from orchestrator.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_full_backup_keeps_the_base_of_the_next_incremental(msim, repo_factory):
    """`backup vm --full` killed (kill -9) while reading: the last committed point's snapshot is
    still there, so the next backup is incremental from it (and is not refused: the killed
    run's writer lease is dead at once, its pid being gone)."""
    sim = msim
    repo = repo_factory("local")
    vm = sim.vm(3)
    args = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
    others = set(sim.fastpath_snapshots(vm))  # other tests' repositories' snapshots of this VM
    r1 = fastpath(*args)
    assert r1["snapshot"] in sim.fastpath_snapshots(vm)
    sim.write(vm, pattern="mixed", count=3, length=64 << 10, seed=41)
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL.format(root=ROOT), *args, "--full"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "reading", proc.stderr.read() if proc.poll() is not None else line
    finally:
        proc.kill()
        proc.wait(30)
    assert r1["snapshot"] in sim.fastpath_snapshots(vm)  # the base survived the killed --full
    r2 = fastpath(*args)
    (d2,) = r2["disks"]
    assert d2["incremental"] and d2["base_mode"] == "agent", d2
    assert "left behind" in r2["_stderr"]  # the killed run's snapshot was cleaned up
    assert set(sim.fastpath_snapshots(vm)) == others | {r2["snapshot"]}
    fastpath("check", repo)
