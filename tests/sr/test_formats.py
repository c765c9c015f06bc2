"""Image format per VDI: XCP-ng 8.3 stores some VDIs as QCOW2 (<uuid>.qcow2 on file SRs,
QCOW2-<uuid> LVs, disks over 2040 GiB). The agent serves them like VHD VDIs; what it refuses,
with an error naming the fallback transport (XAPI's NBD), is a file whose content is not what
its SM name says, and a VHD chain with a QCOW2 parent. The QCOW2 images are made by qemu-img."""

import json
import os
import subprocess
import uuid as uuidlib

import pytest

from agent import sr as sr_mod
from agent import tickets
from agent.qcow2 import Qcow2ChainError
from tests.plugin.test_plugin import XapiFailure, call_plugin, write_config

FALLBACK = "--transport xapi-nbd"
MiB = 1 << 20


def qcow2(path, size="4M", backing=None):
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    subprocess.run(cmd + [path] + ([size] if size else []), check=True, timeout=60)


def qemu_write(path, offset, length, byte):
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P %d %d %d" % (byte, offset, length), path],
        check=True,
        capture_output=True,
        timeout=60,
    )


def qemu_raw(path, tmp_path):
    out = str(tmp_path / ("%s.raw" % uuidlib.uuid4().hex[:6]))
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, out], check=True, timeout=60)
    with open(out, "rb") as f:
        return f.read()


def sm_qcow2_chain(file_sr):
    """base <- leaf as SM's FileSR snapshots: bare file names as backing names."""
    base, leaf = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    bpath = os.path.join(file_sr.dir, base + ".qcow2")
    lpath = os.path.join(file_sr.dir, leaf + ".qcow2")
    qcow2(bpath, "6M")
    qemu_write(bpath, 0, 3 * MiB, 0x11)
    qcow2(lpath, None, backing=base + ".qcow2")
    qemu_write(lpath, 2 * MiB + 4096, 64 * 1024, 0x22)
    return base, leaf, lpath


def test_qcow2_file_served(file_sr, tmp_path):
    base, leaf, lpath = sm_qcow2_chain(file_sr)
    want = qemu_raw(lpath, tmp_path)
    sr = sr_mod.FileSR([file_sr.root])
    for sr_uuid in (file_sr.sr, None):
        with sr.open_export(leaf, sr_uuid) as exp:
            assert exp.size == 6 * MiB and exp.block_size == 2 * MiB
            assert exp.read(0, exp.size) == want
            assert "QCOW2 chain of 2 file(s)" in exp.description
    with sr.open_export(leaf, file_sr.sr, base_uuid=base) as exp:
        assert exp.changed_blocks() == [1]


def test_backing_file_outside_the_roots_refused(file_sr, tmp_path):
    outside = str(tmp_path / "outside.qcow2")
    qcow2(outside)
    leaf = str(uuidlib.uuid4())
    qcow2(os.path.join(file_sr.dir, leaf + ".qcow2"), None, backing=outside)
    # a file SR's backing file is looked up by its name beside the leaf only: the outside file
    # is never opened (nor stat()ed), the chain is incomplete
    with pytest.raises(Qcow2ChainError, match="not found"):
        sr_mod.FileSR([file_sr.root]).open_export(leaf, file_sr.sr)
    # and a sibling that is a symlink leaving the roots is refused
    os.symlink(outside, os.path.join(file_sr.dir, "outside.qcow2"))
    with pytest.raises(sr_mod.OutsideRoots):
        sr_mod.FileSR([file_sr.root]).open_export(leaf, file_sr.sr)


def test_content_must_match_the_name(file_sr):
    vdi = str(uuidlib.uuid4())
    qcow2(file_sr.path(vdi))  # QCOW2 content behind <uuid>.vhd
    with pytest.raises(sr_mod.UnsupportedFormat) as err:
        sr_mod.FileSR([file_sr.root]).open_export(vdi, file_sr.sr)
    assert FALLBACK in str(err.value) and "QCOW2" in str(err.value)
    other = str(uuidlib.uuid4())
    with open(os.path.join(file_sr.dir, other + ".qcow2"), "wb") as f:
        f.write(bytes(1 << 20))  # not QCOW2 behind <uuid>.qcow2
    with pytest.raises(sr_mod.UnsupportedFormat) as err:
        sr_mod.FileSR([file_sr.root]).open_export(other, file_sr.sr)
    assert FALLBACK in str(err.value) and "VHD" in str(err.value)


def test_qcow2_parent_of_a_vhd_refused(file_sr, tmp_path):
    """A differencing VHD whose parent file turns out to be QCOW2: a mixed chain, refused."""
    from tests.fixtures.vhd import Level

    (root, leaf), _ = file_sr.chain([Level(4 << 20), Level(4 << 20)])
    qcow2(os.path.join(file_sr.dir, "x.qcow2"))
    os.replace(os.path.join(file_sr.dir, "x.qcow2"), file_sr.path(root))
    with pytest.raises(sr_mod.UnsupportedFormat) as err:
        sr_mod.FileSR([file_sr.root]).open_export(leaf, file_sr.sr)
    assert FALLBACK in str(err.value) and file_sr.path(root) in str(err.value)


def test_admin_api_and_plugin_open_a_qcow2_vdi(tmp_path, file_sr, agent_proc):
    _base, leaf, _ = sm_qcow2_chain(file_sr)
    agent = agent_proc([file_sr.root])
    resp = tickets.admin_call(agent.admin_socket, {"op": "create_ticket", "vdi": leaf}, timeout=30)
    assert resp["ok"], resp
    config = write_config(tmp_path, agent.admin_socket)
    out = json.loads(call_plugin("open_export", {"vdi": leaf}, config))
    assert out["vdi"] == leaf and out["size"] == 6 * MiB
    # a misnamed one is refused through both, naming the fallback
    bad = str(uuidlib.uuid4())
    qcow2(file_sr.path(bad))
    resp = tickets.admin_call(agent.admin_socket, {"op": "create_ticket", "vdi": bad}, timeout=30)
    assert not resp["ok"] and FALLBACK in resp["error"] and bad in resp["error"]
    with pytest.raises(XapiFailure) as ei:
        call_plugin("open_export", {"vdi": bad}, config)
    assert ei.value.code == "FASTPATH_OPEN_FAILED"
    assert any(FALLBACK in str(p) for p in ei.value.params), json.dumps(ei.value.params)


def test_chain_of_big_l1_tables_is_refused(file_sr, monkeypatch):
    """Every level's L1 table stays in memory while an export is open: a deep chain of tiny
    files with huge L1 tables (512-byte clusters) is bounded by the chain's budget. The budget is
    lowered here so that three 256 KiB tables pass it (64 MiB in the agent)."""
    from agent.qcow2 import UnsupportedQcow2
    from agent.qcow2 import chain as qchain

    monkeypatch.setattr(qchain, "MAX_CHAIN_L1_BYTES", 600 << 10)
    names = [str(uuidlib.uuid4()) for _ in range(3)]
    paths = [os.path.join(file_sr.dir, n + ".qcow2") for n in names]
    for i, p in enumerate(paths):
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512"]
        if i:
            cmd += ["-b", os.path.basename(paths[i - 1]), "-F", "qcow2"]
        subprocess.run(cmd + [p] + ([] if i else ["1G"]), check=True, timeout=60)
    sr = sr_mod.FileSR([file_sr.root])
    with sr.open_export(names[1], file_sr.sr) as export:  # two levels: 512 KiB, within
        assert export.size == 1 << 30
    with pytest.raises(UnsupportedQcow2, match="L1 tables need"):
        sr.open_export(names[2], file_sr.sr)
