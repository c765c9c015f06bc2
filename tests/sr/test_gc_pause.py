"""An open export pauses SM's GC on its SR: hostsim's SM-like GC (hostsim/sm.py) skips its pass
while any export of the SR is open, and coalesces once the last one closes. The agent also runs as
a daemon (`--sm-lock-dir`), so the lock is held by another process, as in dom0."""

import os

import nbd

from agent import smlock
from tests.sr.conftest import MiB, sm_can_lock, snapshot_scenario


def _gc_work_pending(tree, ids):
    tree.sim.destroy(ids["s1"])  # B1 now has one child (B2): coalescable


def test_open_export_pauses_hostsim_gc(sm_tree):
    ids, models = snapshot_scenario(sm_tree)
    _gc_work_pending(sm_tree, ids)
    sr = sm_tree.file_sr()
    exp = sr.open_export(ids["s2"], sm_tree.sr_uuid)
    exp2 = sr.open_export(ids["v"], None)  # found by searching the roots; same SR
    try:
        assert sm_tree.sim.gc_once() == []
        assert sm_tree.sim.gc_skipped == 1
        assert exp.read(0, exp.size) == models["s2"]
        exp.close()
        assert sm_tree.sim.gc_once() == [], "one export of the SR is still open"
    finally:
        exp.close()
        exp2.close()
    actions = sm_tree.sim.gc_once()
    assert [a[0] for a in actions] == ["coalesce"]
    assert actions[0][1:3] == (ids["b2"], ids["b1"])
    # and the data survived the coalesce (read through a fresh export)
    with sr.open_export(ids["s2"], sm_tree.sr_uuid) as exp:
        assert exp.read(0, exp.size) == models["s2"]
        assert len(exp.chain.files) == 2


def test_failed_open_releases_the_gc(sm_tree, sm_processes):
    """An open that fails after the GC was paused (here: SM holds `sr`) lets the GC run again."""
    ids, _ = snapshot_scenario(sm_tree)
    sr = sm_tree.file_sr(sr_lock_timeout=0.2)
    holder = sm_processes(sm_tree.lock_path("sr"))
    assert holder.state == "locked"
    try:
        sr.open_export(ids["s2"], sm_tree.sr_uuid)
    except smlock.SRBusy:
        pass
    else:
        raise AssertionError("open_export succeeded while SM held the sr lock")
    assert not sr.locks.is_gc_paused(sm_tree.sr_uuid)
    assert sm_can_lock(sm_tree.lock_path("running"))


def test_daemon_pauses_gc_while_nbd_client_connected(sm_tree, agent_proc):
    ids, models = snapshot_scenario(sm_tree)
    _gc_work_pending(sm_tree, ids)
    agent = agent_proc([sm_tree.root], extra=["--sm-lock-dir", sm_tree.lock_dir])
    tid = agent.ticket(ids["s2"])
    h = nbd.NBD()
    h.connect_uri(agent.uri(tid))
    try:
        # another process (the agent) holds `running` now: SM's trylock fails, hostsim's GC skips
        assert not sm_can_lock(sm_tree.lock_path("running"))
        skipped = sm_tree.sim.gc_skipped
        assert sm_tree.sim.gc_once() == []
        assert sm_tree.sim.gc_skipped == skipped + 1
        assert h.pread(2 * MiB, 1 * MiB) == models["s2"][1 * MiB : 3 * MiB]
    finally:
        h.shutdown()
        del h
    assert agent.wait_idle()
    assert sm_can_lock(sm_tree.lock_path("running"))
    actions = sm_tree.sim.gc_once()
    assert [a[0] for a in actions] == ["coalesce"]
    assert os.path.exists(sm_tree.sim.vhd_path(ids["s2"]))
