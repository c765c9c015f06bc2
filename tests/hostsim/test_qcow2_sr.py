"""hostsim's QCOW2 VDIs (XCP-ng 8.3): files, snapshots, GC as SM does them, judged by qemu-img
(`info`, `check`, `convert`) and by the agent's QCOW2 reader (hidden flag, uuid from the name)."""

import json
import os
import subprocess

import pytest

from agent import qcow2
from hostsim import guest
from hostsim.errors import XapiError
from hostsim.host import Pool

MiB = 1 << 20


def qemu(*args):
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, timeout=120, check=True
    ).stdout


def qemu_raw(path, tmp_path):
    out = str(tmp_path / (os.path.basename(path) + ".raw"))
    qemu("convert", "-U", "-f", "qcow2", "-O", "raw", path, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


@pytest.fixture
def qpool(tmp_path):
    pool = Pool(tmp_path / "hostsim")
    pool.sr.image_format = "qcow2"
    yield pool
    pool.stop()


def test_vdi_is_a_qcow2_file_qemu_reads_like_hostsim(qpool, tmp_path):
    vm = qpool.create_vm("q", [8 * MiB])
    (vdi,) = qpool.vm_vdis(vm)
    guest.fill_template(qpool, vdi, seed=3)
    uuid = qpool.api.store.field("VDI", vdi, "uuid")
    path = qpool.sr.qcow2_path(uuid)
    assert qpool.sr.image_path(uuid) == path and not os.path.exists(qpool.sr.vhd_path(uuid))
    info = json.loads(qemu("info", "-U", "--output=json", path))
    assert info["format"] == "qcow2" and info["cluster-size"] == 64 << 10
    assert info["virtual-size"] == 8 * MiB
    qemu("check", "-U", path)
    want = qemu_raw(path, tmp_path)
    assert any(want) and qpool.sr.read(uuid, 0, len(want)) == want
    assert qpool.api.store.field("VDI", vdi, "sm_config") == {"image-format": "qcow2"}
    # the blocks hostsim reports allocated are those holding data (zero blocks may be absent)
    blocks = set(qpool.sr.allocated_blocks(uuid))
    for b in range(len(want) // (2 * MiB)):
        if any(want[b * 2 * MiB : (b + 1) * 2 * MiB]):
            assert b in blocks


def test_snapshot_makes_a_backing_chain_like_sm_then_gc_coalesces(qpool, tmp_path):
    api = qpool.api
    vm = qpool.create_vm("q", [6 * MiB])
    (vdi,) = qpool.vm_vdis(vm)
    guest.guest_write(qpool, vdi, "random", count=4, length=256 << 10, seed=1)
    uuid = api.store.field("VDI", vdi, "uuid")
    snap = api.vdi__snapshot(vdi, {})
    snap_uuid = api.store.field("VDI", snap, "uuid")
    base_uuid = api.store.field("VDI", snap, "sm_config")["vhd-parent"]
    assert api.store.field("VDI", vdi, "sm_config")["vhd-parent"] == base_uuid
    for u in (uuid, snap_uuid):
        path = qpool.sr.qcow2_path(u)
        info = json.loads(qemu("info", "-U", "--output=json", path))
        assert info["backing-filename"] == base_uuid + ".qcow2"  # SM's bare sibling name
        assert info["backing-filename-format"] == "qcow2"
        qemu("check", "-U", path)
        with qcow2.open_chain(path) as chain:
            assert [str(f.uuid) for f in chain.files] == [u, base_uuid]
            assert [f.hidden for f in chain.files] == [0, 1]  # SM's "vate" extension
    qemu("check", "-U", qpool.sr.qcow2_path(base_uuid))
    snapped = qemu_raw(qpool.sr.qcow2_path(snap_uuid), tmp_path)
    guest.guest_write(qpool, vdi, "text", count=3, length=64 << 10, seed=2)
    leaf = qemu_raw(qpool.sr.qcow2_path(uuid), tmp_path)
    assert leaf != snapped
    with pytest.raises(XapiError):
        qpool.sr.write(base_uuid, 0, bytes(512))  # a hidden base takes no guest write
    # Only the snapshot is written by nobody: deleting it leaves the base with one child, which
    # SM's GC leaf-coalesces (qemu-img commit into the base, the base takes the leaf's name).
    api.vdi__destroy(snap)
    actions = qpool.sr.gc_once()
    assert ("leaf-coalesce", uuid, base_uuid) in [tuple(a) for a in actions], actions
    assert sorted(os.listdir(qpool.sr.path)) == [uuid + ".qcow2"]
    path = qpool.sr.qcow2_path(uuid)
    qemu("check", "-U", path)
    assert "backing-filename" not in json.loads(qemu("info", "-U", "--output=json", path))
    assert qemu_raw(path, tmp_path) == leaf
    with qcow2.open_chain(path) as chain:
        assert chain.depth == 1 and chain.files[0].hidden == 0
    guest.guest_write(qpool, vdi, "binary", count=2, length=64 << 10, seed=3)  # still writable
    qemu("check", "-U", path)


def test_vdi_create_takes_the_image_format_of_its_sm_config(tmp_path):
    pool = Pool(tmp_path / "hostsim")  # a VHD SR by default
    try:
        api = pool.api
        ref = api.vdi__create(
            {
                "SR": pool.sr_ref,
                "virtual_size": str(4 * MiB),
                "sm_config": {"image-format": "qcow2"},
            }
        )
        uuid = api.store.field("VDI", ref, "uuid")
        assert pool.sr.image_format_of(uuid) == "qcow2"
        assert api.store.field("VDI", ref, "sm_config")["image-format"] == "qcow2"
        vhd = api.vdi__create({"SR": pool.sr_ref, "virtual_size": str(4 * MiB)})
        assert pool.sr.image_format_of(api.store.field("VDI", vhd, "uuid")) == "vhd"
        with pytest.raises(XapiError) as err:
            api.vdi__create(
                {"SR": pool.sr_ref, "virtual_size": str(MiB), "sm_config": {"image-format": "vmdk"}}
            )
        assert "vmdk" in " ".join(err.value.description)
    finally:
        pool.stop()
