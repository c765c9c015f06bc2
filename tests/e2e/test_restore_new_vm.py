"""`fastpath restore ... --to-xapi URL --sr UUID --new-vm NAME` end to end on an in-process
hostsim pool (whose VM.create has XAPI's constructor rules, see tests/hostsim/test_vm_create.py).

A three-disk VM (userdevices 0, 1, 3) is backed up, then restored as a new VM: the VM record
carries the backed-up configuration (the rest is defaulted and listed), its VBDs point at the new
VDIs with the original userdevice order and bootable flags, the new VM starts, and every restored
SR file is byte-identical to the source disk as qemu-img reads both files (a copy of the source
VHD taken before the backup: qemu reads neither through our code); local plain, local encrypted
and S3 (moto) encrypted repositories. Failure paths: VM.create
refused, a VBD.create failing half-way: no half-made VM remains, the restored VDIs are kept,
named in the error, and hold the right bytes.
"""

import os
import shutil
import subprocess

import pytest

from tests.e2e.conftest import MiB, fastpath

SIZES = {"0": 6 * MiB, "1": 4 * MiB + 512 * 1024, "3": 3 * MiB}


@pytest.fixture
def source(hostsim_pool, tmp_path):
    """A Halted VM "web" with disks on userdevices 0 (bootable), 1 and 3, guest data on each,
    a non-default configuration, and a copy of each disk's VHD file taken before any backup."""
    from hostsim import guest

    pool = hostsim_pool
    api, st = pool.api, pool.api.store
    vm = pool.create_vm("web")
    st.update(
        "VM",
        vm,
        name_description="production web server",
        memory_static_max=3 << 30,
        memory_dynamic_max=3 << 30,
        memory_dynamic_min=2 << 30,
        memory_target=2 << 30,
        VCPUs_max=4,
        VCPUs_at_startup=2,
        HVM_boot_params={"order": "dc"},
        platform={"acpi": "1", "apic": "true", "viridian": "true", "timeoffset": "3600"},
        other_config={
            "folder": "/prod",
            "mac_seed": "11111111-2222-3333-4444-555555555555",
            "xcp-fastpath-note": "ours",
        },
    )
    vdis = {}
    for k, (dev, size) in enumerate(SIZES.items()):
        uuid = pool.sr.create(size)
        vdi = api.introduce_vdi(pool.sr_ref, uuid, name_label=f"web disk {dev}")
        api._new_vbd(vm, vdi, dev, "RW", dev == "0")
        guest.guest_write(pool, vdi, "mixed", count=4, length=160 << 10, seed=70 + k)
        vdis[dev] = uuid
    copies = {}
    for uuid in vdis.values():  # the source files as they are before the backup
        copies[uuid] = str(tmp_path / f"source-{uuid}.vhd")
        shutil.copyfile(os.path.join(pool.sr.path, uuid + ".vhd"), copies[uuid])
    return pool, st.field("VM", vm, "uuid"), vdis, copies


def xapi_args(pool):
    return ["--user", "root", "--password", "hostsim"]


def backup(pool, vm_uuid, repo):
    return fastpath(
        "backup", "vm", vm_uuid, "--xapi", pool.server.url, *xapi_args(pool), "--repo", repo
    )


def restore_new_vm(pool, repo, rp_id, name, expect=0, extra=()):
    return fastpath(
        "restore",
        repo,
        rp_id,
        "--to-xapi",
        pool.server.url,
        *xapi_args(pool),
        "--sr",
        pool.sr_uuid,
        "--new-vm",
        name,
        *extra,
        expect=expect,
    )


def qemu_same(a, b):
    """qemu-img compare of two VHD files (qemu's own VHD reader on both sides)."""
    r = subprocess.run(
        ["qemu-img", "compare", "-f", "vpc", "-F", "vpc", a, b],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


def sr_file(pool, uuid):
    return os.path.join(pool.sr.path, uuid + ".vhd")


def vms_named(pool, name):
    return pool.api.store.where("VM", name_label=name)


@pytest.mark.parametrize(
    "kind,encrypted",
    [("local", False), ("local", True), ("s3", True)],
    ids=["local-plain", "local-encrypted", "s3-encrypted"],
)
def test_restore_as_a_new_vm(source, repo_factory, kind, encrypted):
    pool, vm_uuid, vdis, copies = source
    st = pool.api.store
    src_ref = st.by_uuid_ref("VM", vm_uuid)
    src = st.get("VM", src_ref)
    src_vbds = {st.field("VBD", b, "userdevice"): st.get("VBD", b) for b in src["VBDs"]}
    repo = repo_factory(kind, encrypted)
    r = backup(pool, vm_uuid, repo)
    assert sorted(d["vdi"] for d in r["disks"]) == sorted(vdis.values())

    out = restore_new_vm(pool, repo, r["id"], "web restored")
    new = out["new_vm"]
    assert {d["new_vm"] for d in out["disks"]} == {new["uuid"]}
    by_src = {d["vdi"]: d["new_vdi"] for d in out["disks"]}
    assert sorted(by_src) == sorted(vdis.values())
    assert all(by_src[v] != v for v in by_src)

    # The VM record: read back through the XenAPI SDK like any client would.
    import XenAPI

    s = XenAPI.Session(pool.server.url)
    s.xenapi.login_with_password("root", "hostsim", "2.21", "test")
    try:
        x = s.xenapi
        ref = x.VM.get_by_uuid(new["uuid"])
        rec = x.VM.get_record(ref)
        assert rec["name_label"] == "web restored"
        assert rec["power_state"] == "Halted" and rec["is_a_template"] is False
        assert rec["memory_static_max"] == str(3 << 30)
        assert rec["VCPUs_max"] == "4"
        oc = rec["other_config"]
        assert oc["folder"] == "/prod"
        assert oc["fastpath-restored-from-vm"] == vm_uuid
        assert oc["fastpath-restore-point"] == r["id"]
        assert "xcp-fastpath-note" not in oc
        assert oc["mac_seed"] != src["other_config"]["mac_seed"]  # its own MAC addresses
        # Every configuration field is either the source's (when the backup stored it) or
        # a default the result lists: nothing is silently invented.
        from orchestrator.jobs.vmrecord import VM_COPIED_FIELDS

        meta_vm = restore_point_vm(repo, r["id"])
        for field in VM_COPIED_FIELDS:
            if field in meta_vm:
                assert field not in new["defaults"], field
                assert str(rec[field]) == str(meta_vm[field]), field
        assert set(new["defaults"]) <= set(VM_COPIED_FIELDS)
        # backup vm stores the VM's whole configuration: nothing needed a default
        assert new["defaults"] == [], new["defaults"]
        assert rec["VCPUs_at_startup"] == str(src["VCPUs_at_startup"])
        assert (
            rec["platform"] == src["platform"] and rec["HVM_boot_params"] == src["HVM_boot_params"]
        )
        # memory constraints valid: static_min <= dynamic_min <= dynamic_max <= static_max
        m = [int(rec[k]) for k in ("memory_static_min", "memory_dynamic_min")]
        m += [int(rec[k]) for k in ("memory_dynamic_max", "memory_static_max")]
        assert m == sorted(m), m

        # VBDs: the original userdevice order, each on the disk restored from that position.
        vbds = sorted((x.VBD.get_record(b) for b in rec["VBDs"]), key=lambda v: v["userdevice"])
        assert [v["userdevice"] for v in vbds] == sorted(SIZES)
        for v in vbds:
            dev = v["userdevice"]
            assert x.VDI.get_uuid(v["VDI"]) == by_src[vdis[dev]]
            assert v["bootable"] == src_vbds[dev]["bootable"]
            assert (v["mode"], v["type"], v["empty"]) == ("RW", "Disk", False)
            assert x.VDI.get_virtual_size(v["VDI"]) == str(SIZES[dev])
        assert [v["userdevice"] for v in new["vbds"]] == sorted(SIZES)

        # The record is one XAPI would start (VM.start validates VCPUs/actions).
        x.VM.start(ref, False, False)
        assert x.VM.get_power_state(ref) == "Running"
        x.VM.hard_shutdown(ref)
    finally:
        s.xenapi.session.logout()

    # Disks: each restored SR file equals the source file taken before the backup (qemu-img).
    for dev, uuid in vdis.items():
        assert qemu_same(sr_file(pool, by_src[uuid]), copies[uuid]), dev
    # ... and the comparison can fail: two different disks differ.
    assert not qemu_same(sr_file(pool, by_src[vdis["0"]]), copies[vdis["1"]])
    # The source VM is untouched.
    assert st.get("VM", src_ref)["VBDs"] == src["VBDs"]


def restore_point_vm(repo, rp_id):
    r = fastpath("show", repo, rp_id)
    doc = r.get("metadata") or r
    while "metadata" in doc:
        doc = doc["metadata"]
    return doc.get("vm") or {}


def test_vm_create_refused_keeps_the_disks(source, repo_factory, monkeypatch):
    from hostsim.errors import XapiError

    pool, vm_uuid, vdis, copies = source
    repo = repo_factory("local")
    r = backup(pool, vm_uuid, repo)
    vms_before = set(pool.api.store.all_refs("VM"))

    def refuse(record):
        raise XapiError("LICENCE_RESTRICTION", "VM.create")

    monkeypatch.setattr(pool.api, "vm__create", refuse)
    out = restore_new_vm(pool, repo, r["id"], "never", expect=1)
    assert out["ok"] is False
    assert "VM.create: LICENCE_RESTRICTION" in out["error"] and "no VM was created" in out["error"]
    assert set(pool.api.store.all_refs("VM")) == vms_before
    kept = out["kept_vdis"]
    assert len(kept) == 3
    by_src = {d["vdi"]: d["new_vdi"] for d in out["disks"]}
    for uuid in vdis.values():
        assert by_src[uuid] in out["error"]  # the error names every kept disk
        assert pool.api.store.by_uuid_ref("VDI", by_src[uuid])  # and XAPI still has it
        assert qemu_same(sr_file(pool, by_src[uuid]), copies[uuid])


def test_a_failing_vbd_create_leaves_no_half_made_vm(source, repo_factory, monkeypatch):
    from hostsim.errors import XapiError

    pool, vm_uuid, vdis, copies = source
    repo = repo_factory("local")
    r = backup(pool, vm_uuid, repo)
    vbds_before = set(pool.api.store.all_refs("VBD"))
    real = pool.api.vbd__create
    calls = []

    def second_fails(record):
        calls.append(record["userdevice"])
        if len(calls) == 2:
            raise XapiError("SR_BACKEND_FAILURE_46", "", "The VDI is not available", "")
        return real(record)

    monkeypatch.setattr(pool.api, "vbd__create", second_fails)
    out = restore_new_vm(pool, repo, r["id"], "half", expect=1)
    assert calls == ["0", "1"]  # in userdevice order; the first VBD was made
    assert "VBD.create for disk" in out["error"] and "(userdevice 1)" in out["error"]
    assert "the half-made VM was destroyed" in out["error"]
    assert vms_named(pool, "half") == []
    assert set(pool.api.store.all_refs("VBD")) == vbds_before  # its VBD went with it
    by_src = {d["vdi"]: d["new_vdi"] for d in out["disks"]}
    for uuid in vdis.values():
        assert by_src[uuid] in out["error"]
        ref = pool.api.store.by_uuid_ref("VDI", by_src[uuid])
        assert pool.api.store.field("VDI", ref, "VBDs") == []
        assert qemu_same(sr_file(pool, by_src[uuid]), copies[uuid])


def test_one_disk_as_a_new_vm(source, repo_factory):
    pool, vm_uuid, vdis, copies = source
    repo = repo_factory("local")
    r = backup(pool, vm_uuid, repo)
    out = restore_new_vm(pool, repo, r["id"], "just data", extra=["--disk", vdis["3"]])
    (vbd,) = out["new_vm"]["vbds"]
    assert (vbd["userdevice"], vbd["bootable"]) == ("3", True)  # the VM's only disk boots
    (d,) = out["disks"]
    assert qemu_same(sr_file(pool, d["new_vdi"]), copies[vdis["3"]])


def test_new_vm_needs_to_xapi(tmp_path, repo_factory):
    repo = repo_factory("local")
    fastpath("restore", repo, "latest", "-o", tmp_path / "x.raw", "--new-vm", "n", expect=2)


# -- the record itself ---------------------------------------------------------------------------


def test_required_fields_agree_with_hostsims_datamodel():
    from hostsim.api import REQUIRED, VM_CREATE_FIELDS
    from orchestrator.jobs.vmrecord import VM_COPIED_FIELDS, VM_REQUIRED_FIELDS

    assert list(VM_REQUIRED_FIELDS) == [
        k for k, (_t, d) in VM_CREATE_FIELDS.items() if d is REQUIRED
    ]
    assert set(VM_COPIED_FIELDS) <= set(VM_CREATE_FIELDS)


def test_record_from_todays_backup_metadata():
    """Restore points written before backup vm stored the whole configuration (uuid, names,
    memory_static_max, VCPUs_max, other_config only): those are used, everything else XAPI
    requires is defaulted, and listed."""
    from orchestrator.jobs.vmrecord import VM_REQUIRED_FIELDS, vm_create_record

    meta = {
        "uuid": "src-uuid",
        "name_label": "web",
        "name_description": "d",
        "memory_static_max": str(3 << 30),
        "VCPUs_max": "4",
        "other_config": {"folder": "/x", "mac_seed": "m", "fastpath-restore-of": "y"},
    }
    rec, defaulted = vm_create_record("new", meta, "src-uuid/20260101T000000Z")
    assert set(VM_REQUIRED_FIELDS) <= set(rec)
    assert rec["name_label"] == "new" and rec["name_description"] == "d"
    assert rec["memory_static_max"] == rec["memory_dynamic_min"] == str(3 << 30)
    assert rec["VCPUs_max"] == rec["VCPUs_at_startup"] == "4"
    assert rec["other_config"] == {
        "folder": "/x",
        "fastpath-restored-from-vm": "src-uuid",
        "fastpath-restore-point": "src-uuid/20260101T000000Z",
    }
    assert rec["affinity"] == "OpaqueRef:NULL" and rec["is_a_template"] is False
    assert "memory_static_max" not in defaulted and "VCPUs_max" not in defaulted
    assert {"platform", "HVM_boot_policy", "VCPUs_at_startup", "memory_static_min"} <= set(
        defaulted
    )
    # every int64 travels as a string (the XenAPI SDK cannot send Python ints >= 2**31)
    assert all(not isinstance(v, int) or isinstance(v, bool) for v in rec.values())


def test_record_from_a_full_vm_record_is_faithful(hostsim_pool, xapi_session):
    """If the backup stores the whole VM record (as XAPI's get_record gives it), the new VM has
    the same configuration, minus pool references, HA, blocked operations and generation id."""
    from orchestrator.jobs.vmrecord import VM_COPIED_FIELDS, vm_create_record

    x = xapi_session.xenapi
    vm = hostsim_pool.create_vm("pv guest")
    hostsim_pool.api.store.update(
        "VM",
        vm,
        HVM_boot_policy="",
        domain_type="pv",
        PV_bootloader="pygrub",
        PV_args="console=hvc0",
        VCPUs_max=8,
        VCPUs_at_startup=6,
        VCPUs_params={"weight": "512"},
        actions_after_crash="preserve",
        NVRAM={"EFI-variables": "AAAA"},
        tags=["prod"],
        ha_restart_priority="restart",
        ha_always_run=True,
        blocked_operations={"destroy": "protected"},
        generation_id="1:2",
    )
    full = x.VM.get_record(vm)
    rec, defaulted = vm_create_record("copy", full, "p/1")
    assert defaulted == []
    new = x.VM.get_record(x.VM.create(rec))
    for k in VM_COPIED_FIELDS:
        assert new[k] == full[k], k
    assert (new["ha_restart_priority"], new["ha_always_run"]) == ("", False)
    assert new["blocked_operations"] == {} and new["generation_id"] == "0:0"
    assert new["domain_type"] == "pv" and new["PV_bootloader"] == "pygrub"


def test_vbd_plan_uses_stored_flags_and_fixes_userdevices():
    from orchestrator.jobs.vmrecord import vbd_plan

    disks = [
        {"vdi": "c", "new_vdi": "C", "userdevice": "3"},
        {"vdi": "a", "new_vdi": "A", "userdevice": "0"},
        {"vdi": "b", "new_vdi": "B", "userdevice": "0"},  # a clash: gets a free number
        {"vdi": "d", "new_vdi": "D", "userdevice": None},
    ]
    dmeta = {"c": {"bootable": True, "mode": "RO"}, "a": {"bootable": False}}
    plan = vbd_plan(disks, dmeta)
    assert [(p["vdi"], p["userdevice"], p["bootable"], p["mode"]) for p in plan] == [
        ("a", "0", False, "RW"),
        ("b", "1", False, "RW"),
        ("c", "3", True, "RO"),
        ("d", "2", False, "RW"),
    ]
