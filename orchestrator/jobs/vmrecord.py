"""The VM record as fastpath keeps it and makes it again: one table serves backup and restore.

- ``backup vm`` stores ``vm_configuration(record)`` in the restore point's JSON (VM_KEPT_FIELDS:
  identity, memory, vCPUs, boot, platform, NVRAM, BIOS strings...; no references into the pool,
  no runtime state) and, per disk, VBD_KEPT_FIELDS of the disk's VBD.
- ``restore --new-vm`` sends ``vm_create_record(name, stored, point)`` to VM.create (every field
  XAPI requires; what the restore point lacks gets a plain valid default, and is listed) and one
  ``vbd_create_record`` per ``vbd_plan`` entry to VBD.create.

The VM's network interfaces (VIFs: network uuid and name-label, MAC, device) are kept and made
again by ``orchestrator/jobs/vifplan.py``.

VM_FIELDS is the orchestrator's own reading of XAPI's datamodel (xapi-project/xen-api
ocaml/idl/datamodel_vm.ml, the VM class), written independently of hostsim's
(hostsim/api/vm.py): hostsim judges this client, and tests/e2e/test_restore_new_vm.py checks
that the two agree.
"""

from __future__ import annotations

from typing import Any, NamedTuple

NULL_REF = "OpaqueRef:NULL"
GiB = 1 << 30


class VmField(NamedTuple):
    type: str  # XAPI's wire type: int (int64, sent as a string), float, bool, string, map, set, ref
    required: bool  # VM.create refuses a record without it (no ~default_value in the datamodel)
    restore: str  # what restore --new-vm does with it: "copy" from the backup, "set" it, "xapi"'s default


# XAPI's VM.create takes one <struct> with every VM field that is not DynamicRO, in this
# (datamodel) order; a struct missing a required field is refused with INTERNAL_ERROR
# 'Server_helpers.Dispatcher_FieldNotFound("<field>")' (gen_server.ml reads fields with
# Server_helpers.my_assoc). Fields the struct carries that the datamodel does not know are
# ignored, so sending newer optional fields to an older pool is harmless.
#
# Not copied, on purpose: references into the source pool (affinity, appliance, suspend_SR,
# protection_policy, snapshot_schedule), HA settings (a restored copy must not be restarted by
# HA next to its original), blocked_operations (could block our own clean-up), generation_id (a
# restored Windows VM must see a new VM generation ID), and every DynamicRO/runtime field.
VM_FIELDS: dict[str, VmField] = {
    "name_label": VmField("string", True, "set"),  # the name given to restore --new-vm
    "name_description": VmField("string", True, "set"),  # the backed-up VM's
    "user_version": VmField("int", True, "copy"),
    "is_a_template": VmField("bool", True, "set"),
    "affinity": VmField("ref", True, "set"),
    "memory_target": VmField("int", False, "copy"),
    "memory_static_max": VmField("int", True, "copy"),
    "memory_dynamic_max": VmField("int", True, "copy"),
    "memory_dynamic_min": VmField("int", True, "copy"),
    "memory_static_min": VmField("int", True, "copy"),
    "VCPUs_params": VmField("map", True, "copy"),
    "VCPUs_max": VmField("int", True, "copy"),
    "VCPUs_at_startup": VmField("int", True, "copy"),
    "actions_after_shutdown": VmField("string", True, "copy"),
    "actions_after_reboot": VmField("string", True, "copy"),
    "actions_after_crash": VmField("string", True, "copy"),
    "PV_bootloader": VmField("string", True, "copy"),
    "PV_kernel": VmField("string", True, "copy"),
    "PV_ramdisk": VmField("string", True, "copy"),
    "PV_args": VmField("string", True, "copy"),
    "PV_bootloader_args": VmField("string", True, "copy"),
    "PV_legacy_args": VmField("string", True, "copy"),
    "HVM_boot_policy": VmField("string", True, "copy"),
    "HVM_boot_params": VmField("map", True, "copy"),
    "HVM_shadow_multiplier": VmField("float", False, "copy"),
    "platform": VmField("map", True, "copy"),
    "PCI_bus": VmField("string", True, "copy"),
    "other_config": VmField("map", True, "set"),  # the backed-up VM's, minus DROPPED_OTHER_CONFIG
    "recommendations": VmField("string", True, "copy"),
    "xenstore_data": VmField("map", False, "copy"),
    "ha_always_run": VmField("bool", False, "set"),
    "ha_restart_priority": VmField("string", False, "set"),
    "tags": VmField("set", False, "copy"),
    "blocked_operations": VmField("map", False, "set"),
    "protection_policy": VmField("ref", False, "xapi"),
    "is_snapshot_from_vmpp": VmField("bool", False, "xapi"),
    "snapshot_schedule": VmField("ref", False, "xapi"),
    "is_vmss_snapshot": VmField("bool", False, "xapi"),
    "appliance": VmField("ref", False, "xapi"),
    "start_delay": VmField("int", False, "copy"),
    "shutdown_delay": VmField("int", False, "copy"),
    "order": VmField("int", False, "copy"),
    "suspend_SR": VmField("ref", False, "xapi"),
    "version": VmField("int", False, "xapi"),
    "generation_id": VmField("string", False, "xapi"),
    "hardware_platform_version": VmField("int", False, "copy"),
    "has_vendor_device": VmField("bool", False, "copy"),
    "reference_label": VmField("string", False, "copy"),
    "domain_type": VmField("string", False, "copy"),
    "NVRAM": VmField("map", False, "copy"),
}

# The fields VM.create cannot do without, in datamodel order.
VM_REQUIRED_FIELDS = tuple(k for k, f in VM_FIELDS.items() if f.required)
# Configuration copied from the backed-up VM record when the restore point has it.
VM_COPIED_FIELDS = tuple(k for k, f in VM_FIELDS.items() if f.restore == "copy")
# What backup vm stores of the VM record: the copied configuration, and what restore reads
# besides (uuid: the source named in other_config; bios_strings: VM.set_bios_strings).
VM_KEPT_FIELDS = ("uuid", "name_label", "name_description", "other_config", "bios_strings")
VM_KEPT_FIELDS += VM_COPIED_FIELDS

# What a restore needs to attach a disk as it was (backup vm stores these of each disk's VBD).
VBD_KEPT_FIELDS = ("bootable", "mode", "unpluggable")

# other_config keys that describe the source VM instance or our own bookkeeping, not the
# guest's configuration: a new mac_seed gives the copy its own MAC addresses, "disks" is a
# template's provisioning spec, the rest are fastpath's and snapshot marks.
DROPPED_OTHER_CONFIG = ("mac_seed", "default_template", "import_task", "disks")
DROPPED_OTHER_CONFIG_PREFIXES = ("xcp-fastpath", "fastpath", "snapshot")


def vm_configuration(vm_rec: dict[str, Any]) -> dict[str, Any]:
    """What a backup stores of the VM record (VM_KEPT_FIELDS), for a restore to create the VM
    again (restore --new-vm)."""
    return {k: vm_rec[k] for k in VM_KEPT_FIELDS if k in vm_rec}


def _plain_defaults(got: dict[str, Any]) -> dict[str, Any]:
    """A plain, valid configuration derived from what the backup has: memory fixed at
    memory_static_max (static_min = dynamic_min = dynamic_max = target), every vCPU online at
    boot, an HVM guest booting from its disk (a PV one when domain_type says so), XAPI's
    template actions (destroy on shutdown, restart on reboot and crash)."""
    smax = str(got.get("memory_static_max") or GiB)
    vcpus = str(got.get("VCPUs_max") or 1)
    hvm_policy = got.get("HVM_boot_policy")
    if hvm_policy is None:
        hvm_policy = "" if got.get("domain_type") in ("pv", "pvh", "pv_in_pvh") else "BIOS order"
    return {
        "user_version": "1",
        "memory_static_max": smax,
        "memory_dynamic_max": smax,
        "memory_dynamic_min": smax,
        "memory_static_min": smax,
        "memory_target": smax,
        "VCPUs_params": {},
        "VCPUs_max": vcpus,
        "VCPUs_at_startup": vcpus,
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "PV_bootloader": "",
        "PV_kernel": "",
        "PV_ramdisk": "",
        "PV_args": "",
        "PV_bootloader_args": "",
        "PV_legacy_args": "",
        "HVM_boot_policy": hvm_policy,
        "HVM_boot_params": {"order": "dc"} if hvm_policy else {},
        "platform": (
            {"acpi": "1", "apic": "true", "pae": "true", "nx": "true", "hpet": "true"}
            if hvm_policy
            else {}
        ),
        "PCI_bus": "",
        "recommendations": "",
        "domain_type": "hvm" if hvm_policy else "pv",
    }


def vm_create_record(name: str, vm_meta: dict[str, Any], point_id: str) -> tuple[dict, list]:
    """(VM.create record, fields that were not in the backup and got a default).

    ``vm_meta`` is the VM record the backup stored (XenAPI values: int64 as strings); the fields
    it lacks get ``_plain_defaults``. The "set" fields of VM_FIELDS are the restore's own: the
    new name, not a template, no affinity, no HA, nothing blocked, the source's other_config
    without its instance keys and with where the copy comes from.
    """
    got = {k: vm_meta[k] for k in VM_COPIED_FIELDS if vm_meta.get(k) is not None}
    record: dict[str, Any] = {}
    defaulted = []
    for k, v in _plain_defaults(got).items():
        if k in got:
            record[k] = got[k]
        else:
            record[k] = v
            defaulted.append(k)
    for k, v in got.items():
        record.setdefault(k, v)
    other = {
        str(k): str(v)
        for k, v in (vm_meta.get("other_config") or {}).items()
        if k not in DROPPED_OTHER_CONFIG and not str(k).startswith(DROPPED_OTHER_CONFIG_PREFIXES)
    }
    other["fastpath-restored-from-vm"] = str(vm_meta.get("uuid") or "")
    other["fastpath-restore-point"] = point_id
    record.update(
        {
            "name_label": name,
            "name_description": str(vm_meta.get("name_description") or ""),
            "is_a_template": False,
            "affinity": NULL_REF,
            "other_config": other,
            "ha_always_run": False,
            "ha_restart_priority": "",
            "blocked_operations": {},
        }
    )
    # XenAPI values: every int64 travels as a string (the XenAPI SDK cannot send Python ints
    # >= 2**31), floats as floats.
    for k, v in record.items():
        ty = VM_FIELDS[k].type
        if ty == "int":
            record[k] = str(v)
        elif ty == "float":
            record[k] = float(v)
    missing = [k for k in VM_REQUIRED_FIELDS if k not in record]
    assert not missing, missing
    return record, sorted(defaulted)


def vbd_plan(disks: list[dict[str, Any]], dmeta: dict[str, Any]) -> list[dict[str, Any]]:
    """One VBD per restored disk: the original userdevice (unique, in order), bootable and mode
    when the backup has them; else the first disk is the bootable one and disks are RW."""
    used: set[str] = set()
    plan = []

    def key(d):
        u = str(d.get("userdevice") or "")
        return (0, int(u)) if u.isdigit() else (1, 0)

    ordered = sorted(disks, key=key)
    for d in ordered:
        u = str(d.get("userdevice") or "")
        if not u.isdigit() or u in used:
            u = next(str(n) for n in range(len(disks) + len(used) + 1) if str(n) not in used)
        used.add(u)
        info = dmeta.get(d["vdi"], {})
        plan.append(
            {
                "vdi": d["vdi"],
                "new_vdi": d["new_vdi"],
                "userdevice": u,
                "bootable": info.get("bootable"),
                "mode": info.get("mode") or "RW",
                "unpluggable": info.get("unpluggable"),
            }
        )
    if not any(p["bootable"] for p in plan) and plan:
        plan[0]["bootable"] = True
    for p in plan:
        p["bootable"] = bool(p["bootable"])
        p["unpluggable"] = True if p["unpluggable"] is None else bool(p["unpluggable"])
    return plan


def vbd_create_record(vm_ref: str, vdi_ref: str, p: dict[str, Any]) -> dict[str, Any]:
    """VBD.create's record attaching ``vdi_ref`` to ``vm_ref`` as ``p`` (a ``vbd_plan`` entry)
    says: a disk, not empty, no QoS."""
    return {
        "VM": vm_ref,
        "VDI": vdi_ref,
        "userdevice": p["userdevice"],
        "device": "",
        "bootable": p["bootable"],
        "mode": p["mode"],
        "type": "Disk",
        "unpluggable": p["unpluggable"],
        "empty": False,
        "other_config": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
    }
