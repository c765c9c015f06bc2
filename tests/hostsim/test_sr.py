"""hostsim's file SR driven through the XenAPI SDK: snapshots, CBT, data_destroy, fast clone, coalesce.

Contents are judged by readers hostsim did not write: agent.vhd's chain reader and libvhdi (pyvhdi with
set_parent). Guest writes are 4 KiB aligned, so every sector run starts and ends on an 8-sector
boundary (libvhdi's bitmap bug stays out of the way), and chains have equal sizes.
"""

import base64
import hashlib
import os
import random

import pytest
import XenAPI

from agent import vhd
from agent.vhd import format as fmt
from hostsim import guest

MiB = 1 << 20
KiB = 1 << 10


def chain_paths(pool, uuid):
    return [vf.path for vf in pool.sr.chain(uuid)]


def content_agent(pool, uuid):
    with vhd.open_chain(pool.sr.vhd_path(uuid)) as c:
        return c.read(0, c.size)


def content_libvhdi(pyvhdi, pool, uuid):
    paths = chain_paths(pool, uuid)
    files = []
    try:
        for p in paths:
            f = pyvhdi.file()
            f.open(p)
            files.append(f)
        for child, parent in zip(files, files[1:]):
            child.set_parent(parent)
        return files[0].read_buffer_at_offset(files[0].get_media_size(), 0)
    finally:
        for f in files:
            f.close()


def judged(pyvhdi, pool, uuid):
    """Content by agent.vhd, checked equal to libvhdi's and to hostsim's own reader."""
    ours = content_agent(pool, uuid)
    assert content_libvhdi(pyvhdi, pool, uuid) == ours
    assert pool.sr.read(uuid, 0, len(ours)) == ours
    return ours


def footer_of(path):
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        return fmt.Footer.parse(f.read(512))


def expected_bitmap(size, writes):
    nbits = (size + 64 * KiB - 1) // (64 * KiB)
    bm = bytearray((nbits + 7) // 8)
    for off, ln in writes:
        for i in range(off // (64 * KiB), (off + ln - 1) // (64 * KiB) + 1):
            bm[i >> 3] |= 0x80 >> (i & 7)
    return bytes(bm)


def vdi_of(x, vm):
    return x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])


def test_snapshot_has_sm_semantics(hostsim_pool, xapi_session, pyvhdi_module):
    pool, x = hostsim_pool, xapi_session.xenapi
    vm = pool.create_vm("alpha", [8 * MiB], running=True)
    vdi = vdi_of(x, vm)
    uuid = x.VDI.get_uuid(vdi)
    guest.guest_write(pool, vdi, "mixed", count=12, length=96 * KiB, seed=1)
    before = judged(pyvhdi_module, pool, uuid)

    snap_vm = x.VM.snapshot(vm, "backup")
    snap = vdi_of(x, snap_vm)
    srec, vrec = x.VDI.get_record(snap), x.VDI.get_record(vdi)
    assert srec["is_a_snapshot"] is True and srec["snapshot_of"] == vdi
    assert vrec["snapshots"] == [snap] and vrec["uuid"] == uuid
    base_uuid = vrec["sm_config"]["vhd-parent"]
    assert srec["sm_config"]["vhd-parent"] == base_uuid
    base = x.VDI.get_by_uuid(base_uuid)
    assert x.VDI.get_managed(base) is False
    # The leaf became the hidden parent; both new leaves are differencing disks on it.
    assert footer_of(pool.sr.vhd_path(base_uuid)).hidden == 1
    for u in (uuid, srec["uuid"]):
        with vhd.open_chain(pool.sr.vhd_path(u)) as c:
            assert [str(f.uuid) for f in c.files] == [u, base_uuid]
    assert judged(pyvhdi_module, pool, srec["uuid"]) == before
    # Writes after the snapshot change the VM's disk only.
    guest.guest_write(pool, vdi, "random", count=4, length=64 * KiB, seed=2)
    after = judged(pyvhdi_module, pool, uuid)
    assert after != before
    assert judged(pyvhdi_module, pool, srec["uuid"]) == before


def test_cbt_bitmaps_match_the_writes(hostsim_pool, xapi_session):
    pool, x = hostsim_pool, xapi_session.xenapi
    size = 8 * MiB
    vm = pool.create_vm("alpha", [size], running=True)
    vdi = vdi_of(x, vm)
    x.VDI.enable_cbt(vdi)
    assert x.VDI.get_cbt_enabled(vdi) is True
    s1 = vdi_of(x, x.VM.snapshot(vm, "s1"))
    assert x.VDI.get_cbt_enabled(s1) is True
    w1 = guest.guest_write(
        pool, vdi, "text", count=9, length=100 * KiB, seed=3
    )  # spans 64 KiB edges
    s2 = vdi_of(x, x.VM.snapshot(vm, "s2"))
    w2 = guest.guest_write(pool, vdi, "binary", count=5, length=4 * KiB, seed=4)
    s3 = vdi_of(x, x.VM.snapshot(vm, "s3"))

    def changed(a, b):
        return base64.b64decode(x.VDI.list_changed_blocks(a, b))

    assert changed(s1, s2) == expected_bitmap(size, w1)
    assert changed(s2, s3) == expected_bitmap(size, w2)
    assert changed(s1, s3) == expected_bitmap(size, w1 + w2)
    assert changed(s2, s2) == bytes(len(expected_bitmap(size, [])))
    assert len(changed(s1, s2)) * 8 >= size // (64 * KiB)
    # Refused while the target is attached to a running VM (XAPI's VDI_IN_USE rule) ...
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.list_changed_blocks(s3, vdi)
    assert err.value.details == ["VDI_IN_USE", vdi, "list_changed_blocks"]
    # ... and allowed once it is not.
    w3 = guest.guest_write(pool, vdi, "zeros", count=2, length=64 * KiB, seed=5)
    x.VM.hard_shutdown(vm)
    assert changed(s3, vdi) == expected_bitmap(size, w3)
    # A snapshot's CBT cannot be toggled; the disk's can.
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.disable_cbt(s1)
    assert err.value.details[0] == "OPERATION_NOT_ALLOWED"
    x.VDI.disable_cbt(vdi)
    assert x.VDI.get_cbt_enabled(vdi) is False


def test_data_destroy_keeps_only_cbt_metadata(hostsim_pool, xapi_session, tmp_path):
    pool, x = hostsim_pool, xapi_session.xenapi
    size = 4 * MiB
    vm = pool.create_vm("alpha", [size])
    vdi = vdi_of(x, vm)
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.data_destroy(vdi)
    assert err.value.details == ["OPERATION_NOT_ALLOWED", "VDI is not a snapshot: " + vdi]
    plain = x.VDI.snapshot(vdi, {})
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.data_destroy(plain)
    assert err.value.details == ["VDI_NO_CBT_METADATA", plain]
    x.VDI.destroy(plain)

    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi, {})
    w = guest.guest_write(pool, vdi, "random", count=3, length=64 * KiB, seed=6)
    s2 = x.VDI.snapshot(vdi, {})
    s1_uuid = x.VDI.get_uuid(s1)
    x.VDI.data_destroy(s1)
    rec = x.VDI.get_record(s1)
    assert rec["type"] == "cbt_metadata" and rec["cbt_enabled"] is True
    assert not os.path.exists(pool.sr.vhd_path(s1_uuid))
    assert os.path.exists(pool.sr.cbt_path(s1_uuid))
    assert base64.b64decode(x.VDI.list_changed_blocks(s1, s2)) == expected_bitmap(size, w)
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.get_nbd_info(s1)
    assert err.value.details == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"]
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.snapshot(s1, {})
    assert err.value.details == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"]


def test_fast_clone_shares_the_template_base(hostsim_pool, xapi_session, pyvhdi_module):
    pool, x = hostsim_pool, xapi_session.xenapi
    tpl = pool.create_vm("template", [8 * MiB], template=True)
    tvdi = vdi_of(x, tpl)
    guest.fill_template(pool, tvdi, seed=7)
    image = judged(pyvhdi_module, pool, x.VDI.get_uuid(tvdi))
    c1 = x.VM.clone(tpl, "vm1")
    c2 = x.VM.clone(tpl, "vm2")
    assert x.VM.get_is_a_template(c1) is True and x.VM.get_is_a_snapshot(c1) is False
    d1, d2 = vdi_of(x, c1), vdi_of(x, c2)
    u1, u2 = x.VDI.get_uuid(d1), x.VDI.get_uuid(d2)
    assert judged(pyvhdi_module, pool, u1) == image
    assert judged(pyvhdi_module, pool, u2) == image
    # Fast: the clones are empty differencing leaves over the template's data.
    for u in (u1, u2):
        chain = pool.sr.chain(u)
        assert chain[0].allocated() == []
        assert os.path.getsize(chain[0].path) < 64 * KiB
    roots = {pool.sr.chain(u)[-1].uuid for u in (u1, u2, x.VDI.get_uuid(tvdi))}
    assert len(roots) == 1
    guest.guest_write(pool, d1, "random", count=3, length=64 * KiB, seed=8)
    assert judged(pyvhdi_module, pool, u1) != image
    assert judged(pyvhdi_module, pool, u2) == image
    assert judged(pyvhdi_module, pool, x.VDI.get_uuid(tvdi)) == image
    with pytest.raises(XenAPI.Failure) as err:
        x.VM.start(c1, False, False)  # still a template
    assert err.value.details[0] == "VM_IS_TEMPLATE"


def test_gc_coalesces_without_changing_any_vdi(hostsim_pool, xapi_session, pyvhdi_module):
    pool, x = hostsim_pool, xapi_session.xenapi
    vm = pool.create_vm("alpha", [8 * MiB], running=True)
    vdi = vdi_of(x, vm)
    uuid = x.VDI.get_uuid(vdi)
    x.VDI.enable_cbt(vdi)
    snaps = []
    for i in range(3):
        guest.guest_write(pool, vdi, "mixed", count=8, length=64 * KiB, seed=10 + i)
        snaps.append(vdi_of(x, x.VM.snapshot(vm, "s%d" % i)))
    guest.guest_write(pool, vdi, "mixed", count=8, length=64 * KiB, seed=20)

    def contents():
        # What users see: every managed VDI (hidden bases are SM's business and change by design).
        out = {}
        for _ref, rec in x.VDI.get_all_records().items():
            if rec["type"] != "cbt_metadata" and rec["managed"]:
                out[rec["uuid"]] = hashlib.sha256(
                    judged(pyvhdi_module, pool, rec["uuid"])
                ).hexdigest()
        return out

    # Delete the oldest and the middle snapshot (as a backup tool rotates them), then collect.
    keep = snaps[2]
    for s in snaps[:2]:
        x.VM.destroy(x.VBD.get_VM(x.VDI.get_VBDs(s)[0]))
        x.VDI.destroy(s)
    before = contents()
    n_records = len(x.VDI.get_all_records())
    depth_before = len(pool.sr.chain(uuid))
    # Paused GC (someone holds SM's running lock) does nothing.
    import fcntl

    lock = os.path.join(pool.lock_dir, pool.sr_uuid, "running")
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert pool.sr.gc_once() == []
    x.SR.scan(pool.sr_ref)  # kicks SM's GC, as on a real host
    after = contents()
    assert pool.sr.gc_skipped == 1 and pool.sr.gc_runs == 1
    assert len(pool.sr.chain(uuid)) < depth_before
    # Every remaining VDI reads the same; VDI records of coalesced bases are gone.
    assert before == after
    assert len(x.VDI.get_all_records()) < n_records
    for _ref, rec in x.VDI.get_all_records().items():
        if rec["type"] == "cbt_metadata":
            continue
        parent = pool.sr.info(rec["uuid"])["parent"]
        assert rec["sm_config"].get("vhd-parent") == parent
    # CBT still answers across the collected chain.
    assert x.VDI.list_changed_blocks(keep, keep)


def test_leaf_coalesce_after_the_only_snapshot_goes(hostsim_pool, xapi_session, pyvhdi_module):
    pool, x = hostsim_pool, xapi_session.xenapi
    vm = pool.create_vm("alpha", [4 * MiB])
    vdi = vdi_of(x, vm)
    uuid = x.VDI.get_uuid(vdi)
    guest.guest_write(pool, vdi, "text", count=6, length=64 * KiB, seed=30)
    s = x.VDI.snapshot(vdi, {})
    guest.guest_write(pool, vdi, "binary", count=6, length=64 * KiB, seed=31)
    want = judged(pyvhdi_module, pool, uuid)
    assert len(pool.sr.chain(uuid)) == 2
    x.VDI.destroy(s)
    actions = pool.sr.gc_once()
    assert [a[0] for a in actions] == ["leaf-coalesce"]
    assert len(pool.sr.chain(uuid)) == 1
    assert judged(pyvhdi_module, pool, uuid) == want
    assert x.VDI.get_sm_config(vdi) == {}
    assert len(list(x.VDI.get_all_records().values())) == 1


def test_guest_write_through_the_api(hostsim_pool, xapi_session):
    pool, x = hostsim_pool, xapi_session.xenapi
    a = pool.create_vm("a", [4 * MiB])
    b = pool.create_vm("b", [4 * MiB])
    out = xapi_session.xenapi_request(
        "hostsim.write", (a, {"pattern": "random", "count": "3", "seed": "9"})
    )
    ((ua, writes),) = out.items()
    assert len(writes) == 3 and all(int(o) % 4096 == 0 for o, _ in writes)
    xapi_session.xenapi_request(
        "hostsim.write", (b, {"pattern": "copy", "source": a, "count": "3", "seed": "9"})
    )
    ub = x.VDI.get_uuid(vdi_of(x, b))
    for off, ln in writes:
        assert pool.sr.read(ub, int(off), int(ln)) == pool.sr.read(ua, int(off), int(ln))
    assert int(x.VDI.get_physical_utilisation(vdi_of(x, b))) > 3 * 64 * KiB
    rng = random.Random(1)
    assert guest.data_for("zeros", rng, 4096) == bytes(4096)
    with pytest.raises(ValueError):
        guest.data_for("nope", rng, 10)


def test_periodic_gc_collects_after_a_snapshot_is_destroyed(tmp_path):
    import time

    from hostsim.host import Pool

    pool = Pool(tmp_path / "gcpool", gc_interval=0.05)
    try:
        vm = pool.create_vm("alpha", [4 * MiB])
        vdi = pool.vm_vdis(vm)[0]
        uuid = pool.api.store.field("VDI", vdi, "uuid")
        guest.guest_write(pool, vdi, "text", count=4, length=64 * KiB, seed=50)
        snap = pool.api.vdi__snapshot(vdi, {})
        want = content_agent(pool, uuid)
        pool.api.vdi__destroy(snap)  # kicks the GC thread
        deadline = time.monotonic() + 30
        while len(pool.sr.chain(uuid)) > 1:
            assert time.monotonic() < deadline, "the periodic GC did not collect"
            time.sleep(0.02)
        assert content_agent(pool, uuid) == want
        assert pool.sr.gc_runs >= 1
    finally:
        pool.sr.close()


def test_cbt_survives_destroying_a_snapshot_in_the_middle(hostsim_pool, xapi_session):
    pool, x = hostsim_pool, xapi_session.xenapi
    size = 4 * MiB
    vm = pool.create_vm("alpha", [size])
    vdi = vdi_of(x, vm)
    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi, {})
    w1 = guest.guest_write(pool, vdi, "text", count=3, length=64 * KiB, seed=60)
    s2 = x.VDI.snapshot(vdi, {})
    w2 = guest.guest_write(pool, vdi, "text", count=3, length=64 * KiB, seed=61)
    s3 = x.VDI.snapshot(vdi, {})
    x.VDI.destroy(s2)  # its log is folded into the next one, as SM does
    assert base64.b64decode(x.VDI.list_changed_blocks(s1, s3)) == expected_bitmap(size, w1 + w2)
    x.VDI.data_destroy(s1)
    assert base64.b64decode(x.VDI.list_changed_blocks(s1, s3)) == expected_bitmap(size, w1 + w2)
    x.VDI.destroy(s1)  # a cbt_metadata VDI can be destroyed too
    with pytest.raises(XenAPI.Failure):
        x.VDI.get_record(s1)
    # an unrelated VDI is not a CBT ancestor
    other = pool.create_vm("other", [size])
    ovdi = vdi_of(x, other)
    x.VDI.enable_cbt(ovdi)
    os1 = x.VDI.snapshot(ovdi, {})
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.list_changed_blocks(os1, s3)
    assert err.value.details[0] == "SR_BACKEND_FAILURE_460"
