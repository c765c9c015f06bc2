"""QCOW2 VDIs on LVM SRs: QCOW2-<uuid> LVs whose backing names are the parents' device paths
(/dev/VG_XenStorage-<sr>/QCOW2-<uuid>, or .../LV-<uuid> for a raw parent), as SM's LVM driver
writes them. Same stand-ins as tests/sr/test_lvm.py: loop devices (or plain files when losetup is
not permitted) for the LVs and a recording lvs/lvchange; the images are made by qemu-img and the
backing names rewritten with `qemu-img rebase -u` once the data is written."""

import os
import uuid as uuidlib

import pytest

from agent import sr as sr_mod
from agent.export import ChainChanged
from tests.qcow2.helpers import MiB, create, qemu_raw, run, write_random
from tests.sr.test_lvm import LOOP_REASON, fake_vg, lvm_sr  # noqa: F401 (fake_vg: a fixture)


def _rebase(path, backing, fmt):
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", fmt, "-b", backing, path])


def _lv_qcow2_chain(tmp_path, vg, raw_root=False):
    """root (QCOW2- or LV-) <- mid QCOW2- <- leaf QCOW2-, registered as LVs of vg. Returns the
    VDI uuids root first and the bytes the leaf reads as."""
    work = tmp_path / ("work-%s" % uuidlib.uuid4().hex[:6])
    work.mkdir()
    ids = [str(uuidlib.uuid4()) for _ in range(3)]
    if raw_root:
        root = str(work / "root.raw")
        with open(root, "wb") as f:
            f.write(os.urandom(5 * MiB))
        root_fmt, root_lv = "raw", "LV-" + ids[0]
    else:
        root = create(work / "root.qcow2", 6 * MiB)
        write_random(root, 0, 3 * MiB, 1)
        root_fmt, root_lv = "qcow2", "QCOW2-" + ids[0]
    mid = create(work / "mid.qcow2", 6 * MiB, backing=root, backing_fmt=root_fmt)
    write_random(mid, MiB + 4096, 2 * MiB, 2)
    leaf = create(work / "leaf.qcow2", backing=mid)
    write_random(leaf, 4 * MiB, 64 * 1024, 3)
    want = qemu_raw(leaf)
    dev = "/dev/%s/" % vg.vg
    _rebase(mid, dev + root_lv, root_fmt)
    _rebase(leaf, dev + "QCOW2-" + ids[1], "qcow2")
    vg.add(root_lv, root)
    vg.add("QCOW2-" + ids[1], mid)
    vg.add("QCOW2-" + ids[2], leaf, writable=True)
    return ids, want


@pytest.mark.parametrize("raw_root", [False, True], ids=["qcow2-root", "raw-root"])
def test_chain_of_qcow2_lvs(tmp_path, fake_vg, raw_root):  # noqa: F811
    vg = fake_vg()
    ids, want = _lv_qcow2_chain(tmp_path, vg, raw_root)
    sr = lvm_sr(vg)
    with sr.open_export(ids[2], vg.sr_uuid) as exp:
        assert exp.read(0, exp.size) == want, LOOP_REASON
        files = exp.chain.files
        assert [f.kind for f in files] == ["qcow2", "qcow2", "raw" if raw_root else "qcow2"]
        assert [str(f.uuid) for f in files] == ids[::-1]
        assert all(sr.lvm.users(vg.vg, n) == 1 for n in vg.lvs)
    assert all(sr.lvm.users(vg.vg, n) == 0 for n in vg.lvs)
    with sr.open_export(ids[2], vg.sr_uuid, base_uuid=ids[1]) as exp:
        assert exp.changed_blocks() == [2]


def test_backing_lv_missing(tmp_path, fake_vg):  # noqa: F811
    vg = fake_vg()
    ids, _ = _lv_qcow2_chain(tmp_path, vg)
    del vg.lvs["QCOW2-" + ids[1]]
    sr = lvm_sr(vg)
    with pytest.raises(Exception) as ei:
        sr.open_export(ids[2], vg.sr_uuid)
    assert "not a QCOW2-/LV- volume" in str(ei.value) and "\n" not in str(ei.value)
    assert all(sr.lvm.users(vg.vg, n) == 0 for n in vg.lvs)


def test_guard_sees_the_leaf_lv_written(tmp_path, fake_vg):  # noqa: F811
    """On a block device mtime says nothing: the guard re-reads the QCOW2 header and L1 table
    (here: its one entry dropped, as a discard of the whole disk or a rewrite would)."""
    vg = fake_vg()
    ids, _ = _lv_qcow2_chain(tmp_path, vg)
    exp = lvm_sr(vg).open_export(ids[2], vg.sr_uuid)
    try:
        exp.read(0, 4096)
        dev = vg.lvs["QCOW2-" + ids[2]]["backing"]
        with open(dev, "rb") as f:
            l1 = int.from_bytes(f.read(48)[40:48], "big")
        with open(dev, "r+b") as f:
            f.seek(l1)
            f.write(bytes(8))
        with pytest.raises(ChainChanged) as ei:
            exp.read(0, 4096)
        assert "metadata" in str(ei.value)
    finally:
        exp.close()


def test_file_sr_and_lvm_sr_behind_one_storage(tmp_path, fake_vg, file_sr):  # noqa: F811
    vg = fake_vg()
    ids, want = _lv_qcow2_chain(tmp_path, vg)
    storage = sr_mod.Storage(sr_mod.FileSR([file_sr.root]), lvm_sr(vg))
    with storage.open_export(ids[2]) as exp:
        assert exp.read(0, exp.size) == want
