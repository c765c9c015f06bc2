"""hostsim's VM.create (and the VBD.create / VM.start / VM.set_bios_strings rules around it),
called through the unmodified XenAPI SDK, against XAPI's semantics:

- every VM field without a default in XAPI's datamodel (ocaml/idl/datamodel_vm.ml) is required;
  a struct without one fails as XAPI's generated dispatcher fails: INTERNAL_ERROR
  'Server_helpers.Dispatcher_FieldNotFound("<field>")', the first missing field in datamodel
  order, and nothing is created;
- optional fields take the datamodel's defaults, unknown fields are ignored, a mac_seed is
  added, domain_type is derived from HVM_boot_policy, the VM is Halted;
- values are checked at VM.start, not at create (Xapi_vm.create: "parameter validation is
  delayed until VM.start").
"""

import pytest

from hostsim.api import REQUIRED, VM_CREATE_FIELDS

MiB = 1 << 20
NULL = "OpaqueRef:NULL"

REQUIRED_FIELDS = [k for k, (_t, d) in VM_CREATE_FIELDS.items() if d is REQUIRED]


def full_record(**over):
    rec = {
        "name_label": "restored",
        "name_description": "a test VM",
        "user_version": "1",
        "is_a_template": False,
        "affinity": NULL,
        "memory_static_max": str(2 << 30),
        "memory_dynamic_max": str(2 << 30),
        "memory_dynamic_min": str(1 << 30),
        "memory_static_min": str(512 * MiB),
        "VCPUs_params": {"weight": "256"},
        "VCPUs_max": "4",
        "VCPUs_at_startup": "2",
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "PV_bootloader": "",
        "PV_kernel": "",
        "PV_ramdisk": "",
        "PV_args": "",
        "PV_bootloader_args": "",
        "PV_legacy_args": "",
        "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "dc"},
        "platform": {"acpi": "1", "viridian": "true"},
        "PCI_bus": "",
        "other_config": {"folder": "/restored"},
        "recommendations": "",
    }
    rec.update(over)
    return rec


def failure(excinfo):
    return list(excinfo.value.details)


def vm_count(x):
    return len(x.VM.get_all())


def test_the_required_list_is_xapis():
    """The required fields are exactly the VM fields XAPI's datamodel gives no default (the
    constructor of XAPI's OCaml client lists them all; these have no ~default_value)."""
    assert REQUIRED_FIELDS == [
        "name_label",
        "name_description",
        "user_version",
        "is_a_template",
        "affinity",
        "memory_static_max",
        "memory_dynamic_max",
        "memory_dynamic_min",
        "memory_static_min",
        "VCPUs_params",
        "VCPUs_max",
        "VCPUs_at_startup",
        "actions_after_shutdown",
        "actions_after_reboot",
        "actions_after_crash",
        "PV_bootloader",
        "PV_kernel",
        "PV_ramdisk",
        "PV_args",
        "PV_bootloader_args",
        "PV_legacy_args",
        "HVM_boot_policy",
        "HVM_boot_params",
        "platform",
        "PCI_bus",
        "other_config",
        "recommendations",
    ]


def test_create_a_complete_record(xapi_session):
    x = xapi_session.xenapi
    ref = x.VM.create(full_record(unknown_field="ignored", tags=["a"]))
    rec = x.VM.get_record(ref)
    assert rec["power_state"] == "Halted"
    assert rec["name_label"] == "restored" and rec["name_description"] == "a test VM"
    # int64 come back as strings, like XAPI's
    assert rec["memory_static_max"] == str(2 << 30)
    assert rec["memory_dynamic_min"] == str(1 << 30)
    assert rec["memory_static_min"] == str(512 * MiB)
    assert (rec["VCPUs_max"], rec["VCPUs_at_startup"]) == ("4", "2")
    assert rec["VCPUs_params"] == {"weight": "256"}
    assert rec["HVM_boot_params"] == {"order": "dc"}
    assert rec["platform"] == {"acpi": "1", "viridian": "true"}
    assert rec["tags"] == ["a"]
    assert "unknown_field" not in rec
    # datamodel defaults for what was not given
    assert rec["HVM_shadow_multiplier"] == 1.0
    assert rec["NVRAM"] == {} and rec["xenstore_data"] == {} and rec["blocked_operations"] == {}
    assert rec["ha_always_run"] is False and rec["ha_restart_priority"] == ""
    assert rec["generation_id"] == "0:0"
    # what Xapi_vm.create adds: a mac_seed, domain_type from HVM_boot_policy
    assert rec["other_config"]["folder"] == "/restored"
    assert len(rec["other_config"]["mac_seed"]) == 36
    assert rec["domain_type"] == "hvm"
    # DynamicRO fields are XAPI's own
    assert rec["is_a_snapshot"] is False and rec["VBDs"] == [] and rec["resident_on"] == NULL
    assert x.VM.get_by_uuid(rec["uuid"]) == ref


def test_pv_domain_type_and_given_mac_seed(xapi_session):
    x = xapi_session.xenapi
    ref = x.VM.create(
        full_record(HVM_boot_policy="", PV_bootloader="pygrub", other_config={"mac_seed": "s"})
    )
    rec = x.VM.get_record(ref)
    assert rec["domain_type"] == "pv" and rec["PV_bootloader"] == "pygrub"
    assert rec["other_config"] == {"mac_seed": "s"}
    ref2 = x.VM.create(full_record(domain_type="pvh"))
    assert x.VM.get_domain_type(ref2) == "pvh"


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_a_missing_required_field_fails_like_xapi(xapi_session, field):
    import XenAPI

    x = xapi_session.xenapi
    before = vm_count(x)
    rec = full_record()
    del rec[field]
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.create(rec)
    assert failure(e) == [
        "INTERNAL_ERROR",
        f'Server_helpers.Dispatcher_FieldNotFound("{field}")',
    ]
    assert vm_count(x) == before


def test_the_first_missing_field_in_datamodel_order_is_named(xapi_session):
    """The tiny record restore used to send: XAPI stops at user_version (after the names)."""
    import XenAPI

    x = xapi_session.xenapi
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.create(
            {
                "name_label": "tiny",
                "name_description": "",
                "memory_static_max": str(1 << 30),
                "other_config": {},
            }
        )
    assert failure(e) == [
        "INTERNAL_ERROR",
        'Server_helpers.Dispatcher_FieldNotFound("user_version")',
    ]
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.create({})
    assert failure(e)[1] == 'Server_helpers.Dispatcher_FieldNotFound("name_label")'


@pytest.mark.parametrize(
    "field,value",
    [
        ("memory_static_max", "lots"),
        ("VCPUs_max", True),
        ("is_a_template", "no"),
        ("actions_after_crash", "explode"),
        ("platform", {"acpi": 1}),
        ("platform", "acpi=1"),
        ("tags", "a,b"),
        ("HVM_shadow_multiplier", "fast"),
        ("name_label", 7),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(xapi_session, field, value):
    import XenAPI

    x = xapi_session.xenapi
    before = vm_count(x)
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.create(full_record(**{field: value}))
    code, text = failure(e)
    assert code == "INTERNAL_ERROR" and f"VM.{field}" in text
    assert vm_count(x) == before


def test_wrong_parameter_count_and_non_struct(xapi_session):
    import XenAPI

    with pytest.raises(XenAPI.Failure) as e:
        xapi_session.xenapi_request("VM.create", ())
    assert failure(e)[:2] == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.create"]
    with pytest.raises(XenAPI.Failure) as e:
        xapi_session.xenapi.VM.create("not a struct")
    assert failure(e)[0] == "INTERNAL_ERROR"


def test_int64_as_xmlrpc_int_or_string(xapi_session):
    """XAPI's int64_of_rpc takes both <int> and the string form clients use above 2**31."""
    x = xapi_session.xenapi
    ref = x.VM.create(full_record(VCPUs_max=4, VCPUs_at_startup="4", user_version=2))
    assert (x.VM.get_VCPUs_max(ref), x.VM.get_user_version(ref)) == ("4", "2")


def test_enums_are_case_insensitive_and_stored_lowercase(xapi_session):
    x = xapi_session.xenapi
    ref = x.VM.create(full_record(actions_after_crash="Preserve"))
    assert x.VM.get_actions_after_crash(ref) == "preserve"


def test_vbds_on_a_created_vm_and_destroy_keeps_the_vdis(hostsim_pool, xapi_session):
    import XenAPI

    x = xapi_session.xenapi
    sr = hostsim_pool.sr_ref
    vdis = [
        x.VDI.create(
            {
                "SR": sr,
                "virtual_size": str(4 * MiB),
                "name_label": f"d{i}",
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
            }
        )
        for i in range(2)
    ]
    vm = x.VM.create(full_record())

    def vbd(vdi, userdevice, bootable=False, **over):
        rec = {
            "VM": vm,
            "VDI": vdi,
            "userdevice": userdevice,
            "bootable": bootable,
            "mode": "RW",
            "type": "Disk",
            "unpluggable": False,
            "empty": False,
            "other_config": {"k": "v"},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
        rec.update(over)
        return x.VBD.create(rec)

    b0 = vbd(vdis[0], "0", True)
    b3 = vbd(vdis[1], "3", mode="RO")
    assert x.VM.get_VBDs(vm) == [b0, b3]
    r0, r3 = x.VBD.get_record(b0), x.VBD.get_record(b3)
    assert (r0["userdevice"], r0["bootable"], r0["mode"]) == ("0", True, "RW")
    assert (r3["userdevice"], r3["bootable"], r3["mode"]) == ("3", False, "RO")
    assert r0["unpluggable"] is False and r0["other_config"] == {"k": "v"}
    assert r0["currently_attached"] is False
    assert x.VDI.get_VBDs(vdis[0]) == [b0]

    with pytest.raises(XenAPI.Failure) as e:  # userdevice unique per VM
        vbd(vdis[1], "3")
    assert failure(e) == ["DEVICE_ALREADY_EXISTS", "3"]
    with pytest.raises(XenAPI.Failure) as e:
        vbd(vdis[1], "5", type="CD")
    assert failure(e) == ["VBD_CDS_MUST_BE_READONLY"]
    with pytest.raises(XenAPI.Failure) as e:
        vbd(NULL, "5", empty=True)
    assert failure(e) == ["VBD_NOT_REMOVABLE_MEDIA", "in constructor"]
    with pytest.raises(XenAPI.Failure) as e:
        vbd(vdis[1], "xvdz")
    assert failure(e) == ["INVALID_DEVICE", "xvdz"]

    x.VM.start(vm, False, False)
    assert x.VBD.get_currently_attached(b0) is True
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)
    assert not x.VBD.get_all()
    for v in vdis:  # VM.destroy drops VBDs, never disks
        assert x.VDI.get_VBDs(v) == []


def test_start_validates_what_create_accepted(xapi_session):
    """XAPI delays validation to VM.start: VCPUs_at_startup > VCPUs_max is created, then refused
    by start with Xapi_vm_helpers.validate_vcpus' error."""
    import XenAPI

    x = xapi_session.xenapi
    vm = x.VM.create(full_record(VCPUs_max="2", VCPUs_at_startup="3"))
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.start(vm, False, False)
    assert failure(e) == [
        "VALUE_NOT_SUPPORTED",
        "VCPUs-at-startup",
        "3",
        "value greater than VCPUs-max",
    ]
    assert x.VM.get_power_state(vm) == "Halted"
    vm = x.VM.create(full_record(VCPUs_max="0", VCPUs_at_startup="0"))
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.start(vm, False, False)
    assert failure(e) == ["INVALID_VALUE", "VCPUs_max", "0"]
    vm = x.VM.create(full_record(actions_after_crash="coredump_and_restart"))
    with pytest.raises(XenAPI.Failure) as e:  # an HVM domain cannot coredump
        x.VM.start(vm, False, False)
    assert failure(e)[:3] == [
        "VALUE_NOT_SUPPORTED",
        "VM.actions_after_crash",
        "coredump_and_restart",
    ]
    ok = x.VM.create(full_record())
    x.VM.start(ok, False, False)
    assert x.VM.get_power_state(ok) == "Running"


def test_set_bios_strings_once(xapi_session):
    import XenAPI

    x = xapi_session.xenapi
    vm = x.VM.create(full_record())
    x.VM.set_bios_strings(vm, {"bios-vendor": "Xen", "system-serial-number": "42"})
    assert x.VM.get_bios_strings(vm) == {"bios-vendor": "Xen", "system-serial-number": "42"}
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.set_bios_strings(vm, {"bios-vendor": "other"})
    assert failure(e) == ["VM_BIOS_STRINGS_ALREADY_SET"]


def test_a_snapshot_keeps_the_configuration(hostsim_pool, xapi_session):
    x = xapi_session.xenapi
    vm = hostsim_pool.create_vm("cfg", disk_sizes=[2 * MiB])
    x.VM.set_name_description(vm, "d")
    snap = x.VM.snapshot(vm, "s")
    a, b = x.VM.get_record(vm), x.VM.get_record(snap)
    for k in VM_CREATE_FIELDS:
        if k not in ("name_label", "is_a_template"):
            assert a[k] == b[k], k
    assert b["is_a_snapshot"] is True and b["is_a_template"] is True
