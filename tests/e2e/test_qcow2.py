"""Backups of QCOW2 VDIs (XCP-ng 8.3: `<uuid>.qcow2` files, snapshots as qemu backing chains) from
a `hostsim serve --image-format qcow2`, judged by qemu-img: full, guest writes, incremental (which
reads only the 2 MiB blocks the writes touched), restore of both points compared with the snapshot
images by `qemu-img compare`, over the agent's NBD and HTTP, xapi-nbd and XAPI's export (hostsim
decodes a QCOW2 VDI through qemu and re-encodes it as VHD, inline); then SM's GC coalesces the
chain (`qemu-img commit`) and a third, incremental backup restores to the new snapshot."""

import os
import subprocess

import pytest

from tests.e2e.conftest import MiB, Sim, fastpath

BLOCK = 2 * MiB
TRANSPORTS = ["nbd", "http", "xapi-nbd", "xapi-export"]


@pytest.fixture(scope="module")
def qsim(tmp_path_factory):
    s = Sim(
        tmp_path_factory.mktemp("hostsim-qcow2"),
        vms=len(TRANSPORTS),
        disk_size="32M",
        image_format="qcow2",
    )
    yield s
    s.stop()


def image_of(sim, vdi):
    path = os.path.join(sim.info["sr"]["path"], vdi + ".qcow2")
    assert os.path.exists(path), "hostsim keeps the VDI as %s" % path
    return path


def qemu_compare(raw, image):
    """qemu-img compare -f raw -F qcow2 (-U: hostsim may hold the image in a qemu-nbd)."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(raw), image],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hostsim_makes_qcow2_vdis_like_sm(qsim):
    vdi = qsim.vm_disk(0)
    path = image_of(qsim, vdi)
    assert not os.path.exists(path[: -len(".qcow2")] + ".vhd")
    with open(path, "rb") as f:
        assert f.read(4) == b"QFI\xfb"
    rec = qsim.x.VDI.get_record(qsim.x.VDI.get_by_uuid(vdi))
    assert rec["sm_config"]["image-format"] == "qcow2"
    check = subprocess.run(
        ["qemu-img", "check", "-U", path], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_full_incremental_restore(qsim, repo_factory, tmp_path, transport):
    pos = TRANSPORTS.index(transport)
    repo = repo_factory("local")
    vm, vdi = qsim.vm(pos), qsim.vm_disk(pos)
    base = ["backup", "vm", vm, "--hostsim", qsim.root, "--repo", repo, "--transport", transport]

    r1 = fastpath(*base)
    (d1,) = r1["disks"]
    assert d1["transport"] == transport and not d1["incremental"], d1
    snap1 = image_of(qsim, d1["snapshot_vdi"])
    full = tmp_path / "full.raw"
    fastpath("restore", repo, r1["id"], "--disk", vdi, "-o", full)
    qemu_compare(full, snap1)
    first = full.read_bytes()

    written = qsim.write(vm, pattern="mixed", count=3, length=64 << 10, seed=40 + pos)
    runs = [(int(off), int(n)) for off, n in written[vdi]]  # XML-RPC strings
    touched = {b for off, n in runs for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)}
    r2 = fastpath(*base)
    (d2,) = r2["disks"]
    assert d2["incremental"], d2
    if transport in ("nbd", "http"):
        # the agent sends only the changed 2 MiB blocks of the chain
        assert 0 < d2["bytes_read"] <= len(touched) * BLOCK, (d2, sorted(touched))
    assert d2["bytes_read"] < d1["bytes_read"], (d1, d2)
    incr = tmp_path / "incr.raw"
    fastpath("restore", repo, r2["id"], "--disk", vdi, "-o", incr)
    qemu_compare(incr, image_of(qsim, d2["snapshot_vdi"]))
    assert incr.read_bytes() != first  # the guest writes are in the second point only
    again = tmp_path / "again.raw"
    fastpath("restore", repo, r1["id"], "--disk", vdi, "-o", again)
    assert again.read_bytes() == first

    if transport != "nbd":
        return
    # SM's GC: the hidden base left by the first (now deleted) snapshot is committed into its
    # parent; the next incremental diffs against the coalesced chain.
    before = tmp_path / "before-gc.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image_of(qsim, vdi), str(before)],
        check=True,
        timeout=120,
    )
    actions = qsim.gc()
    assert any(a[0] == "coalesce" for a in actions), actions
    qemu_compare(before, image_of(qsim, vdi))  # the guest's disk reads the same after the commit
    qsim.write(vm, pattern="text", count=2, length=64 << 10, seed=50)
    r3 = fastpath(*base)
    (d3,) = r3["disks"]
    assert d3["incremental"], d3
    third = tmp_path / "third.raw"
    fastpath("restore", repo, r3["id"], "--disk", vdi, "-o", third)
    qemu_compare(third, image_of(qsim, d3["snapshot_vdi"]))
    check = subprocess.run(
        ["qemu-img", "check", "-U", image_of(qsim, d3["snapshot_vdi"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_restore_into_a_qcow2_sr_through_xapi(qsim, repo_factory, tmp_path):
    """`restore --to-xapi` into the QCOW2 SR: VDI.create makes a `<uuid>.qcow2`, import_raw_vdi
    writes it through qemu, and it reads (qemu-img compare) as the restore point."""
    repo = repo_factory("local")
    vm, vdi = qsim.vm(0), qsim.vm_disk(0)
    r = fastpath("backup", "vm", vm, "--hostsim", qsim.root, "--repo", repo, "--transport", "nbd")
    raw = tmp_path / "point.raw"
    fastpath("restore", repo, r["id"], "--disk", vdi, "-o", raw)
    out = fastpath(
        "restore",
        repo,
        r["id"],
        "--to-xapi",
        qsim.url,
        "--hostsim",
        qsim.root,
        "--sr",
        qsim.info["sr"]["uuid"],
    )
    (d,) = out["disks"]
    assert d["vdi"] == vdi and d["new_vdi"] != vdi
    qemu_compare(raw, image_of(qsim, d["new_vdi"]))
