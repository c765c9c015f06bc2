"""agent.smlock against SM's own locking: another process taking the lock files with fcntl record
locks exactly as SM's drivers/flock.py does (POSIX locks only conflict between processes, so SM is
always a child process here), and hostsim's GC (which flocks `running`)."""

import os
import threading

import pytest

from agent import smlock
from tests.sr.conftest import sm_can_lock


def test_pause_gc_excludes_sm_and_is_counted(sm_tree):
    locks = sm_tree.locks()
    running = sm_tree.lock_path("running")
    a = locks.pause_gc(sm_tree.sr_uuid)
    assert locks.is_gc_paused(sm_tree.sr_uuid)
    assert not sm_can_lock(running)
    b = locks.pause_gc(sm_tree.sr_uuid)  # a second export of the same SR shares the hold
    a.release()
    a.release()  # idempotent
    assert not sm_can_lock(running), "released while another export still holds it"
    b.release()
    assert not locks.is_gc_paused(sm_tree.sr_uuid)
    assert sm_can_lock(running)


def test_abort_like_sm_tools(sm_tree, sm_processes):
    """A GC holds `running`: we raise SM's abort flag, the GC lets go, we hold `running`, and the
    flag is cleared again (cleanup.abort's sequence)."""
    locks = sm_tree.locks()
    flag = os.path.join(sm_tree.ipc_dir, sm_tree.sr_uuid, "abort")
    gc = sm_processes(sm_tree.lock_path("running"), mode="abortable", flag=flag)
    assert gc.state == "locked"
    with locks.pause_gc(sm_tree.sr_uuid):
        assert gc.proc.stdout.readline().strip() == "aborting"
        assert locks.aborts_requested == 1
        assert not os.path.exists(flag)
        assert not sm_can_lock(sm_tree.lock_path("running"))
    assert sm_can_lock(sm_tree.lock_path("running"))


def test_gc_that_does_not_abort(sm_tree, sm_processes):
    locks = sm_tree.locks(abort_timeout=0.3)
    flag = os.path.join(sm_tree.ipc_dir, sm_tree.sr_uuid, "abort")
    gc = sm_processes(sm_tree.lock_path("running"), mode="hold")
    assert gc.state == "locked"
    with pytest.raises(smlock.GCBusy) as err:
        locks.pause_gc(sm_tree.sr_uuid)
    assert sm_tree.sr_uuid in str(err.value) and "running" in str(err.value)
    assert not os.path.exists(flag), "our abort flag must not outlive the attempt"
    assert not locks.is_gc_paused(sm_tree.sr_uuid)
    gc.stop()
    with locks.pause_gc(sm_tree.sr_uuid):
        assert not sm_can_lock(sm_tree.lock_path("running"))


def test_someone_elses_abort_flag_is_left_alone(sm_tree, sm_processes):
    locks = sm_tree.locks(abort_timeout=0.2)
    flag = os.path.join(sm_tree.ipc_dir, sm_tree.sr_uuid, "abort")
    os.makedirs(os.path.dirname(flag))
    with open(flag, "w") as f:
        f.write("1\n")
    gc = sm_processes(sm_tree.lock_path("running"), mode="hold")
    assert gc.state == "locked"
    with pytest.raises(smlock.GCBusy):
        locks.pause_gc(sm_tree.sr_uuid)
    assert os.path.exists(flag)
    assert locks.aborts_requested == 0


def test_sr_lock_is_brief_and_bounded(sm_tree, sm_processes):
    locks = sm_tree.locks(sr_lock_timeout=0.3)
    with locks.sr_locked(sm_tree.sr_uuid):
        assert not sm_can_lock(sm_tree.lock_path("sr"))
    assert sm_can_lock(sm_tree.lock_path("sr"))
    holder = sm_processes(sm_tree.lock_path("sr"))
    assert holder.state == "locked"
    with pytest.raises(smlock.SRBusy) as err:
        with locks.sr_locked(sm_tree.sr_uuid):
            pass
    assert "sr" in str(err.value)


def test_sr_lock_threads_do_not_drop_each_other(sm_tree):
    """POSIX locks are per process: two threads must be serialised by us, and one thread's close
    must not drop the lock the other holds."""
    locks = sm_tree.locks(sr_lock_timeout=5)
    inside = []
    errors = []
    gate = threading.Barrier(2)

    def worker():
        try:
            gate.wait(5)
            for _ in range(20):
                with locks.sr_locked(sm_tree.sr_uuid):
                    inside.append(1)
                    assert len(inside) == 1, "two threads inside the sr lock"
                    inside.pop()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_disabled_without_lock_dir(tmp_path):
    locks = smlock.SMLocks(lock_dir=str(tmp_path / "missing"))
    assert not locks.enabled
    with locks.pause_gc("0f2c3a51-8d3a-4b7e-9a39-1d2f5c6b7e80"):
        pass
    assert not os.path.exists(str(tmp_path / "missing"))


def test_lock_names_are_checked(sm_tree):
    locks = sm_tree.locks()
    for bad in ("../etc", "a/b", ".hidden", ""):
        with pytest.raises(smlock.SMLockError):
            locks.pause_gc(bad)
