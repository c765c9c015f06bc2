"""A QCOW2 chain served by agent.export.Export and by the agent's NBD and HTTP servers, read by
clients we did not write (nbdcopy, nbdinfo, curl) and compared with qemu's own NBD server
(`qemu-nbd -r -f qcow2`) and decoding (`qemu-img convert`) of the same chain. The chains are laid
out as SM's file SR lays them out: <uuid>.qcow2 files, bare backing names."""

import json
import os
import random
import shutil
import subprocess
import time
import urllib.request

import pytest

from agent import qcow2
from agent.export import HOLE, SENDFILE, ChainChanged, Export
from tests.qcow2.helpers import KiB, MiB, create, io, qemu_raw, run, sm_chain, write_random

TOOLS = ("nbdinfo", "nbdcopy", "qemu-nbd", "qemu-img", "qemu-io")
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in TOOLS), reason="needs %s (make setup)" % ", ".join(TOOLS)
)


def vdi_of(path):
    return os.path.basename(path)[: -len(".qcow2")]


def test_plan_read_is_sendfile_of_whole_clusters(tmp_path, qemu_tools):
    paths = sm_chain(tmp_path, 12 * MiB, 3, seed=21)
    want = qemu_raw(paths[-1])
    with Export(qcow2.open_chain(paths[-1]), guard=True) as exp:
        assert exp.block_size == 2 * MiB and exp.size == len(want)
        assert exp.read(0, exp.size) == want
        kinds = set()
        for off in range(0, exp.size, 256 * KiB):  # nbdcopy's request size
            n = min(256 * KiB, exp.size - off)
            out = []
            for piece in exp.plan_read(off, n):
                kinds.add(piece[0])
                if piece[0] == SENDFILE:
                    _, fd, foff, length = piece
                    assert foff % (64 * KiB) == off % (64 * KiB) or length < 64 * KiB
                    out.append(os.pread(fd, length, foff))
                elif piece[0] == HOLE:
                    out.append(bytes(piece[1]))
                else:
                    out.append(piece[1])
            assert b"".join(out) == want[off : off + n], off
        assert kinds <= {SENDFILE, HOLE}  # nothing assembled in memory: every cluster whole
        rnd = random.Random(21)
        for _ in range(200):  # requests of any alignment, within and across blocks
            off = rnd.randrange(exp.size)
            n = rnd.randrange(min(exp.size - off, 5 * MiB) + 1)
            assert exp.read(off, n) == want[off : off + n], (off, n)
        assert exp.counters.snapshot() is not None
        assert "QCOW2 chain of 3 file(s)" in exp.description


def test_changed_relative_to_a_base(tmp_path, qemu_tools):
    paths = sm_chain(tmp_path, 12 * MiB, 3, seed=22)
    from tests.qcow2.helpers import qemu_blocks_above

    with Export(qcow2.open_chain(paths[-1]), qcow2.open_chain(paths[0])) as exp:
        assert exp.changed_blocks() == qemu_blocks_above(paths[-1], 2)
        runs = exp.changed(0, exp.size)
        assert sum(n for _o, n, _c in runs) == exp.size
    with Export(qcow2.open_chain(paths[-1])) as exp:  # no base: allocated somewhere
        assert exp.changed_blocks() == qemu_blocks_above(paths[-1], 3)
    with qcow2.open_chain(paths[-1]) as chain:
        assert chain.changed_blocks(paths[-1]) == []
        other = create(tmp_path / "other.qcow2", 12 * MiB)
        with pytest.raises(qcow2.Qcow2ChainError) as ei:
            chain.changed_blocks(other)
        assert "not an ancestor" in str(ei.value)


def test_guard_sees_a_write_to_the_leaf(tmp_path, qemu_tools):
    paths = sm_chain(tmp_path, 8 * MiB, 2, seed=23)
    exp = Export(qcow2.open_chain(paths[-1]), guard=True)
    try:
        exp.read(0, 4096)
        before = os.path.getsize(paths[-1])
        io(paths[-1], "write -P 0x99 %d 4096" % (8 * MiB - 4096))  # allocates a cluster
        assert os.path.getsize(paths[-1]) > before
        with pytest.raises(ChainChanged) as ei:
            exp.check()
        assert "size changed" in str(ei.value)
        with pytest.raises(ChainChanged):
            exp.read(0, exp.size)
    finally:
        exp.close()


class QemuNbd(object):
    """qemu-nbd -r -f qcow2 on a unix socket: qemu's answers for the same chain."""

    def __init__(self, path, sock):
        self.sock = sock
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "qcow2", "-k", sock, "-e", "4", "-t", path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 30
        while not os.path.exists(sock):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.time() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        self.uri = "nbd+unix:///?socket=%s" % sock

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.proc.stderr.close()


def zero_map(uri):
    """nbdinfo --map as (offset, length, reads-as-zero) runs, merged."""
    out = []
    for e in json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout):
        z = bool(e["type"] & 2)
        if out and out[-1][2] == z:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], z)
        else:
            out.append((e["offset"], e["length"], z))
    return out


@needs_tools
def test_nbd_server_against_qemu_nbd(tmp_path, file_sr, agent_proc):
    paths = sm_chain(file_sr.dir, 40 * MiB, 3, seed=24, writes_per_level=6)
    io(paths[-1], "write -z %d %d" % (8 * MiB, 3 * MiB))
    write_random(paths[0], 30 * MiB, 5 * MiB, 25)  # the root: under everything above
    leaf = paths[-1]
    agent = agent_proc([file_sr.root])
    uri = agent.uri(agent.ticket(vdi_of(leaf)))
    qemu = QemuNbd(leaf, str(tmp_path / "q.sock"))
    try:
        ours, theirs = str(tmp_path / "ours.raw"), str(tmp_path / "theirs.raw")
        run(["nbdcopy", "--connections=4", uri, ours])
        run(["nbdcopy", qemu.uri, theirs])
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            assert a.read() == b.read()
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", ours, leaf])
        # what reads as zeros: ours from metadata, qemu's the same (qemu also calls a zero
        # cluster allocated, which nbdinfo shows as "zero" without "hole": the zero bit is
        # what both servers promise)
        assert zero_map(uri) == zero_map(qemu.uri)
        stats = agent.stats()
        assert stats.get("sendfile_bytes", 0) > 0 and stats.get("assembled_bytes", 0) == 0, stats
    finally:
        qemu.stop()
    # changed since the root: fastpath:changed against qemu-img map's depths
    from tests.qcow2.helpers import qemu_blocks_above

    uri = agent.uri(agent.ticket(vdi_of(leaf), base=vdi_of(paths[0])))
    changed = set()
    for e in json.loads(run(["nbdinfo", "--map=fastpath:changed", "--json", uri]).stdout):
        if e["type"] & 1:
            changed.update(
                range(e["offset"] // (2 * MiB), (e["offset"] + e["length"]) // (2 * MiB))
            )
    assert sorted(changed) == qemu_blocks_above(leaf, 2)


@needs_tools
def test_http_streams(tmp_path, file_sr, agent_proc):
    paths = sm_chain(file_sr.dir, 10 * MiB, 2, seed=26)
    want = qemu_raw(paths[-1])
    agent = agent_proc([file_sr.root])
    resp = agent.admin(op="create_ticket", vdi=vdi_of(paths[-1]))
    url = resp["http"]["url"]
    with urllib.request.urlopen(url, timeout=60) as r:
        info = json.loads(r.read())
    assert info["size"] == len(want) and info["block_size"] == 2 * MiB
    with urllib.request.urlopen(url + "/raw", timeout=60) as r:
        assert r.read() == want
    vhd_out = str(tmp_path / "out.vhd")
    with urllib.request.urlopen(url + "/vhd", timeout=60) as r, open(vhd_out, "wb") as f:
        shutil.copyfileobj(r, f)
    raw_out = str(tmp_path / "vhd.raw")
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd_out, raw_out])
    with open(raw_out, "rb") as f:
        assert f.read() == want
