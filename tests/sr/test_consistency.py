"""Coalesce-safe reads without the GC lock (docs/consistency.md).

The SR is hostsim's SM-like file SR; its GC (hostsim/sm.py, what SM's cleanup.py does) coalesces
with the real on-disk effects: a hidden VHD's sectors written into its parent in place, children
relinked, files deleted or renamed. The exports here are opened WITHOUT pausing the GC.

Two situations:
- benign: S2's parent B2 is coalesced into its grandparent B1 (after S1 is deleted). The export
  holds B2 open and reads B2's sectors from B2, so what it returns is still S2's data; the guard
  sees the deleted/modified files and fails later reads cleanly.
- hazardous: S2 (the exported snapshot) is deleted and its sibling V is leaf-coalesced into their
  shared parent B2, overwriting in place sectors that S2 reads from B2. Without the guard this
  returns a mix of S2's and V's data (shown below by reading planned pieces past the guard).

Models are bytearrays of what each VDI must read as; every successful read is compared with them.
"""

import random
import threading

import nbd
import pytest

from agent.export import ChainChanged
from tests.sr.conftest import KiB, MiB, snapshot_scenario

CHUNK = 256 * KiB


def _hazard(tree, ids):
    tree.sim.destroy(ids["s2"])
    actions = tree.sim.gc_once()
    assert ("leaf-coalesce", ids["v"], ids["b2"]) in actions, actions


def _benign(tree, ids):
    tree.sim.destroy(ids["s1"])
    actions = tree.sim.gc_once()
    assert any(a[0] == "coalesce" and a[1] == ids["b2"] for a in actions), actions


def _read_pieces(pieces):
    import os

    out = []
    for p in pieces:
        if p[0] == "hole":
            out.append(bytes(p[1]))
        elif p[0] == "bytes":
            out.append(p[1])
        else:
            out.append(os.pread(p[1], p[3], p[2]))
    return b"".join(out)


def test_hazard_is_real_and_detected(sm_tree):
    ids, models = snapshot_scenario(sm_tree)
    sr = sm_tree.file_sr(locked=False)
    exp = sr.open_export(ids["s2"], sm_tree.sr_uuid)
    try:
        assert exp.read(0, exp.size) == models["s2"]
        pieces = exp.plan_read(0, exp.size)  # planned (and checked) before the change
        _hazard(sm_tree, ids)
        # Past the guard, the same plan now returns mixed data: this is what must never leave.
        mixed = _read_pieces(pieces)
        assert mixed != models["s2"]
        assert mixed != models["v"]
        with pytest.raises(ChainChanged) as err:
            exp.check()
        assert ids["s2"] in str(err.value) or ids["b2"] in str(err.value)
        with pytest.raises(ChainChanged):
            exp.read(0, CHUNK)
        with pytest.raises(ChainChanged):
            exp.plan_read(4 * MiB, CHUNK)
    finally:
        exp.close()


def test_benign_coalesce_reads_identical_until_detected(sm_tree):
    ids, models = snapshot_scenario(sm_tree)
    sr = sm_tree.file_sr(locked=False)
    exp = sr.open_export(ids["s2"], sm_tree.sr_uuid)
    try:
        pieces = exp.plan_read(0, exp.size)
        _benign(sm_tree, ids)
        # The argument of docs/consistency.md: the coalesce wrote into B1 only sectors that the
        # chain reads from B2 (held open), so the old plan still returns S2's bytes exactly.
        assert _read_pieces(pieces) == models["s2"]
        with pytest.raises(ChainChanged):
            exp.read(0, CHUNK)
    finally:
        exp.close()
    with sr.open_export(ids["s2"], sm_tree.sr_uuid) as fresh:
        assert len(fresh.chain.files) == 2
        assert fresh.read(0, fresh.size) == models["s2"]


def _stream_while(tree, ids, models, mutate, delay, read, max_passes=400):
    """Read the whole disk in chunks (read(offset, n) -> bytes), pass after pass, while `mutate`
    runs after `delay` seconds, until one full pass after the mutation finished (bounded).
    Returns (chunks read, failure or None); asserts every chunk read equals the model."""
    size = len(models["s2"])
    t = threading.Timer(delay, mutate, (tree, ids))
    t.start()
    done = 0
    failure = None
    try:
        for _ in range(max_passes):
            finished = t.finished.is_set() and not t.is_alive()
            for off in range(0, size, CHUNK):
                try:
                    data = read(off, CHUNK)
                except Exception as exc:  # the clean failure: recorded, stream ends
                    failure = exc
                    break
                assert data == models["s2"][off : off + CHUNK], (
                    "mixed data at offset %d after %d chunks" % (off, done)
                )
                done += 1
            if failure is not None:
                break
            if finished:  # a whole pass started after the mutation: done
                break
    finally:
        t.join(30)
    return done, failure


@pytest.mark.parametrize("mutate", [_hazard, _benign], ids=["hazard", "benign"])
def test_export_streaming_during_gc(sm_tree, mutate):
    """Many trials, each streaming while the GC changes the chain at a random moment: every chunk
    equals S2's model, or the read fails with ChainChanged; never mixed data."""
    rng = random.Random(4)
    outcomes = []
    for _trial in range(8):
        ids, models = snapshot_scenario(sm_tree)
        sr = sm_tree.file_sr(locked=False)
        exp = sr.open_export(ids["s2"], sm_tree.sr_uuid)
        try:
            done, failure = _stream_while(
                sm_tree, ids, models, mutate, rng.uniform(0, 0.02), exp.read
            )
        finally:
            exp.close()
        if failure is not None:
            assert isinstance(failure, ChainChanged), repr(failure)
        outcomes.append(failure is None)
    assert not all(outcomes), "the change never landed mid-stream: the test proves nothing"


def _nbd_reader(h):
    return lambda offset, n: h.pread(n, offset)


def test_nbd_stream_during_coalesce_without_gc_lock(sm_tree, agent_proc):
    """libnbd reads from the agent daemon (GC lock deliberately off) while hostsim's GC coalesces
    S2's parent into its grandparent: each read returns S2's bytes or fails (EIO), never others."""
    agent = agent_proc([sm_tree.root], extra=["--sm-lock-dir", ""])
    rng = random.Random(7)
    failures = 0
    for _trial in range(5):
        ids, models = snapshot_scenario(sm_tree)
        tid = agent.ticket(ids["s2"])
        h = nbd.NBD()
        h.connect_uri(agent.uri(tid))
        try:
            done, failure = _stream_while(
                sm_tree, ids, models, _benign, rng.uniform(0, 0.01), _nbd_reader(h)
            )
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass
            h = None
        if failure is not None:
            assert isinstance(failure, nbd.Error), repr(failure)
            failures += 1
    assert failures, "the coalesce never landed mid-stream: the test proves nothing"


def test_nbd_read_after_the_hazard_fails_with_eio(sm_tree, agent_proc):
    """Deterministic, through a client we did not write: a connection opened on S2, then S2 is
    deleted and V leaf-coalesced into B2; every later data read fails (EIO) instead of returning
    V's bytes."""
    ids, models = snapshot_scenario(sm_tree)
    agent = agent_proc([sm_tree.root], extra=["--sm-lock-dir", ""])
    tid = agent.ticket(ids["s2"])
    h = nbd.NBD()
    h.connect_uri(agent.uri(tid))
    try:
        assert h.pread(2 * MiB, 2 * MiB) == models["s2"][2 * MiB : 4 * MiB]
        _hazard(sm_tree, ids)
        with pytest.raises(nbd.Error) as err:
            h.pread(2 * MiB, 2 * MiB)
        assert err.value.errno in (5, "EIO")
        with pytest.raises(nbd.Error):
            h.pread(CHUNK, 0)
    finally:
        h.shutdown()
        h = None
    assert "changed under the export" in agent.log()
