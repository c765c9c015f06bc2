"""VM: the VM class's field table and its methods.

- VM_CREATE_FIELDS: the fields of XAPI's VM.create record, with their types and XAPI's
  defaults (REQUIRED: none, the record must carry it); `vm_defaults()` makes a complete VM
  record as XAPI's database holds one (hostsim's pool builder and VM.snapshot/clone use it).
- VM.create, VM.start (with XAPI's delayed parameter validation; placed on a host that sees
  the VM's SRs, hostsim/api/hosts.py), VM.start_on, VM.pool_migrate, clean/hard_shutdown,
  snapshot, clone (the disks through hostsim/api/storage.py, the VBDs through vbd.py),
  destroy, set_bios_strings.

This table is hostsim's own reading of XAPI's datamodel, written independently of the
orchestrator's VM.create record (orchestrator/jobs/vmrecord.py): hostsim judges that client,
and tests/e2e/test_restore_new_vm.py ties the two together.
"""

import copy

from hostsim import errors as E
from hostsim.api.marshal import REQUIRED, unmarshal_field, unmarshal_record
from hostsim.errors import XapiError
from hostsim.store import NULL_REF, new_uuid, xapi_time

# -- VM.create: XAPI's constructor record ------------------------------------------------------
#
# XAPI (ocaml/idl/datamodel_vm.ml, the VM class; xapi-project/xen-api) generates VM.create from
# the VM fields that are not DynamicRO: each is read from the <struct> by
# Server_helpers.my_assoc, which raises Dispatcher_FieldNotFound for a field that has no
# ~default_value (ocaml/idl/ocaml_backend/gen_server.ml, server_helpers.ml); the dispatcher turns
# that exception into INTERNAL_ERROR [Printexc.to_string exn] (exnHelper.ml), i.e.
# ["INTERNAL_ERROR", 'Server_helpers.Dispatcher_FieldNotFound("user_version")'].  Fields the
# struct has but the datamodel does not know are ignored.  Xapi_vm.create then adds a random
# other_config:mac_seed when none is given, derives domain_type from HVM_boot_policy when it is
# "unspecified", and creates the VM Halted; "parameter validation is delayed until VM.start"
# (xapi_vm.ml), where Xapi_vm_helpers.validate_basic_parameters checks VCPUs and memory.
#
# name -> (type, default); REQUIRED marks the fields without a default.
ON_NORMAL_EXIT = ("destroy", "restart")
ON_CRASH = (
    "destroy",
    "coredump_and_destroy",
    "restart",
    "coredump_and_restart",
    "preserve",
    "rename_restart",
)
DOMAIN_TYPES = ("hvm", "pv", "pv_in_pvh", "pvh", "unspecified")
VM_CREATE_FIELDS = {
    "name_label": ("string", REQUIRED),
    "name_description": ("string", REQUIRED),
    "user_version": ("int", REQUIRED),
    "is_a_template": ("bool", REQUIRED),
    "affinity": ("ref", REQUIRED),
    "memory_target": ("int", 0),
    "memory_static_max": ("int", REQUIRED),
    "memory_dynamic_max": ("int", REQUIRED),
    "memory_dynamic_min": ("int", REQUIRED),
    "memory_static_min": ("int", REQUIRED),
    "VCPUs_params": ("map", REQUIRED),
    "VCPUs_max": ("int", REQUIRED),
    "VCPUs_at_startup": ("int", REQUIRED),
    "actions_after_shutdown": (ON_NORMAL_EXIT, REQUIRED),
    "actions_after_reboot": (ON_NORMAL_EXIT, REQUIRED),
    "actions_after_crash": (ON_CRASH, REQUIRED),
    "PV_bootloader": ("string", REQUIRED),
    "PV_kernel": ("string", REQUIRED),
    "PV_ramdisk": ("string", REQUIRED),
    "PV_args": ("string", REQUIRED),
    "PV_bootloader_args": ("string", REQUIRED),
    "PV_legacy_args": ("string", REQUIRED),
    "HVM_boot_policy": ("string", REQUIRED),
    "HVM_boot_params": ("map", REQUIRED),
    "HVM_shadow_multiplier": ("float", 1.0),
    "platform": ("map", REQUIRED),
    "PCI_bus": ("string", REQUIRED),
    "other_config": ("map", REQUIRED),
    "recommendations": ("string", REQUIRED),
    "xenstore_data": ("map", {}),
    "ha_always_run": ("bool", False),
    "ha_restart_priority": ("string", ""),
    "tags": ("set", []),
    "blocked_operations": ("map", {}),
    "protection_policy": ("ref", NULL_REF),
    "is_snapshot_from_vmpp": ("bool", False),
    "snapshot_schedule": ("ref", NULL_REF),
    "is_vmss_snapshot": ("bool", False),
    "appliance": ("ref", NULL_REF),
    "start_delay": ("int", 0),
    "shutdown_delay": ("int", 0),
    "order": ("int", 0),
    "suspend_SR": ("ref", NULL_REF),
    "version": ("int", 0),
    "generation_id": ("string", "0:0"),
    "hardware_platform_version": ("int", 0),
    "has_vendor_device": ("bool", False),
    "reference_label": ("string", ""),
    "domain_type": (DOMAIN_TYPES, "unspecified"),
    "NVRAM": ("map", {}),
}


def vm_defaults(**kw):
    """A complete VM record as XAPI's database holds one: VM.create's fields (XAPI's defaults,
    and for the fields without one the values of a plain 1 GiB, 1 vCPU HVM guest) plus the
    DynamicRO fields XAPI fills itself."""
    rec = {}
    for name, (_ty, default) in VM_CREATE_FIELDS.items():
        if default is not REQUIRED:
            rec[name] = copy.deepcopy(default)
    rec.update(
        {
            "uuid": new_uuid(),
            "name_label": "",
            "name_description": "",
            "user_version": 1,
            "is_a_template": False,
            "affinity": NULL_REF,
            "memory_target": 1 << 30,
            "memory_static_max": 1 << 30,
            "memory_dynamic_max": 1 << 30,
            "memory_dynamic_min": 1 << 30,
            "memory_static_min": 1 << 29,
            "VCPUs_params": {},
            "VCPUs_max": 1,
            "VCPUs_at_startup": 1,
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
            "HVM_boot_params": {"order": "cdn"},
            "platform": {"acpi": "1", "apic": "true", "pae": "true", "nx": "true"},
            "PCI_bus": "",
            "other_config": {},
            "recommendations": "",
            "domain_type": "hvm",
            # DynamicRO: what XAPI sets, never the caller
            "power_state": "Halted",
            "is_default_template": False,
            "is_a_snapshot": False,
            "is_control_domain": False,
            "snapshot_of": NULL_REF,
            "snapshots": [],
            "snapshot_time": xapi_time(0),
            "snapshot_info": {},
            "snapshot_metadata": "",
            "transportable_snapshot_id": "",
            "parent": NULL_REF,
            "children": [],
            "suspend_VDI": NULL_REF,
            "resident_on": NULL_REF,
            "memory_overhead": 0,
            "VBDs": [],
            "VIFs": [],
            "VUSBs": [],
            "VGPUs": [],
            "VTPMs": [],
            "consoles": [],
            "crash_dumps": [],
            "attached_PCIs": [],
            "domid": -1,
            "domarch": "",
            "last_boot_CPU_flags": {},
            "metrics": NULL_REF,
            "guest_metrics": NULL_REF,
            "last_booted_record": "",
            "blobs": {},
            "bios_strings": {},
            "requires_reboot": False,
            "allowed_operations": [],
            "current_operations": {},
        }
    )
    rec.update(kw)
    return rec


class VMMethods:
    """VM.* (a mixin of hostsim.api.Xapi)."""

    def vm__create(self, record):
        """XAPI's VM.create: every field of VM_CREATE_FIELDS without a default is required (the
        first missing one, in datamodel order, is named in XAPI's INTERNAL_ERROR), unknown
        fields are ignored, a random other_config:mac_seed is added when absent, domain_type
        "unspecified" is derived from HVM_boot_policy, and the VM is Halted. Values are not
        validated here (XAPI: "parameter validation is delayed until VM.start")."""
        fields = unmarshal_record("VM", VM_CREATE_FIELDS, record)
        fields["other_config"].setdefault("mac_seed", new_uuid())
        if fields["domain_type"] == "unspecified":
            fields["domain_type"] = "pv" if fields["HVM_boot_policy"] == "" else "hvm"
        return self.store.add("VM", vm_defaults(**fields))

    def _validate_basic_parameters(self, vm, rec):
        """Xapi_vm_helpers.validate_basic_parameters, run by VM.start: VCPUs, shadow multiplier,
        actions_after_crash. (Memory constraints are coerced there, so they rarely fail.)"""
        vmax, vstart = rec["VCPUs_max"], rec["VCPUs_at_startup"]
        if vmax < 1:
            raise XapiError(E.INVALID_VALUE, "VCPUs_max", vmax)
        if vstart < 1:
            raise XapiError(E.INVALID_VALUE, "VCPUs-at-startup", vstart)
        if vstart > vmax:
            raise XapiError(
                E.VALUE_NOT_SUPPORTED, "VCPUs-at-startup", vstart, "value greater than VCPUs-max"
            )
        if rec["HVM_shadow_multiplier"] < 1.0:
            raise XapiError(E.INVALID_VALUE, "HVM_shadow_multiplier", rec["HVM_shadow_multiplier"])
        crash = rec["actions_after_crash"]
        if crash == "rename_restart":
            raise XapiError(
                E.VALUE_NOT_SUPPORTED,
                "VM.actions_after_crash",
                crash,
                "option would leak a domain; VMs and not domains are managed by this API",
            )
        if crash.startswith("coredump") and rec["domain_type"] != "pv":
            raise XapiError(
                E.VALUE_NOT_SUPPORTED,
                "VM.actions_after_crash",
                crash,
                "cannot invoke a coredump of an HVM, PVH or PV-in-PVH domain",
            )

    def vm__set_bios_strings(self, vm, value):
        """XAPI's VM.set_bios_strings: only once (VM_BIOS_STRINGS_ALREADY_SET), a Halted VM,
        string values of at most 512 characters."""
        rec = self.store.get("VM", vm)
        if rec["bios_strings"]:
            raise XapiError(E.VM_BIOS_STRINGS_ALREADY_SET)
        if rec["power_state"] != "Halted":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "halted", rec["power_state"].lower())
        value = unmarshal_field("VM", "bios_strings", "map", value)
        for k, v in value.items():
            if len(v) > 512:
                raise XapiError(E.INVALID_VALUE, k, "length exceeds 512 characters")
        self.store.update("VM", vm, bios_strings=value)
        return ""

    def vm__start(self, vm, start_paused, force):
        self._check_startable(vm)
        self._set_power(vm, "Running", self.place_vm(vm))
        return ""

    def vm__start_on(self, vm, host, start_paused, force):
        self._check_startable(vm)
        self.check_host_can_run(vm, host)
        self._set_power(vm, "Running", host)
        return ""

    def _check_startable(self, vm):
        rec = self.store.get("VM", vm)
        if rec["is_a_template"] or rec["is_a_snapshot"]:
            raise XapiError(E.VM_IS_TEMPLATE, vm, "start")
        if rec["power_state"] != "Halted":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "halted", rec["power_state"].lower())
        self._validate_basic_parameters(vm, rec)

    def vm__pool_migrate(self, vm, host, options):
        """Live migration inside the pool: a running VM moves to ``host``, which must see
        every SR of the VM's disks (VM_REQUIRES_SR); the disks stay where they are."""
        rec = self.store.get("VM", vm)
        if rec["power_state"] != "Running":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "running", rec["power_state"].lower())
        self.check_host_can_run(vm, host)
        self._set_resident(vm, rec["resident_on"], host)
        return ""

    def _set_resident(self, vm, old, new, **fields):
        """resident_on (and ``fields``) of the VM in one modification, host.resident_VMs kept
        in step."""
        if old != new and old != NULL_REF and self.store.exists("host", old):
            self.store.list_remove("host", old, "resident_VMs", vm)
        if old != new and new != NULL_REF:
            self.store.list_add("host", new, "resident_VMs", vm)
        self.store.update("VM", vm, resident_on=new, **fields)

    def _set_power(self, vm, state, host=None):
        if state == "Running" and host is None:
            host = self.place_vm(vm)
        old = self.store.field("VM", vm, "resident_on")
        self._set_resident(vm, old, host if state == "Running" else NULL_REF, power_state=state)
        for vbd in self.store.field("VM", vm, "VBDs"):
            self.store.update("VBD", vbd, currently_attached=state == "Running")
        for vif in self.store.field("VM", vm, "VIFs"):
            self.store.update("VIF", vif, currently_attached=state == "Running")

    def _shutdown(self, vm):
        rec = self.store.get("VM", vm)
        if rec["power_state"] != "Running":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "running", rec["power_state"].lower())
        self._set_power(vm, "Halted")
        return ""

    def vm__clean_shutdown(self, vm):
        return self._shutdown(vm)

    def vm__hard_shutdown(self, vm):
        return self._shutdown(vm)

    def vm__snapshot(self, vm, new_name):
        return self._copy_vm(vm, new_name, snapshot=True)

    def vm__clone(self, vm, new_name):
        rec = self.store.get("VM", vm)
        if rec["power_state"] != "Halted":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "halted", rec["power_state"].lower())
        return self._copy_vm(vm, new_name, snapshot=False)

    def _copy_vm(self, vm, new_name, snapshot):
        rec = self.store.get("VM", vm)
        if snapshot and rec["is_a_snapshot"]:
            raise XapiError(E.OPERATION_NOT_ALLOWED, "cannot snapshot a snapshot")
        vbds = [(vbd, self.store.get("VBD", vbd)) for vbd in rec["VBDs"]]
        disks = []
        for _vbd, vrec in vbds:
            if vrec["VDI"] == NULL_REF or vrec["type"] != "Disk":
                continue
            new_vdi = self._copy_vdi(vrec["VDI"], snapshot=snapshot)
            disks.append((new_vdi, vrec))
        now = xapi_time()
        config = {k: copy.deepcopy(rec[k]) for k in VM_CREATE_FIELDS if k in rec}
        config.update(
            name_label=new_name,
            is_a_template=snapshot or rec["is_a_template"],
            is_a_snapshot=snapshot,
            snapshot_of=vm if snapshot else NULL_REF,
            snapshot_time=now if snapshot else xapi_time(0),
            parent=vm if not snapshot else rec["parent"],
            bios_strings=copy.deepcopy(rec.get("bios_strings", {})),
        )
        fields = vm_defaults(**config)
        new_vm = self.store.add("VM", fields)
        for new_vdi, vrec in disks:
            self._new_vbd(
                new_vm,
                new_vdi,
                vrec["userdevice"],
                vrec["mode"],
                vrec["bootable"],
                vbd_type=vrec["type"],
                unpluggable=vrec.get("unpluggable", True),
                other_config=dict(vrec.get("other_config", {})),
            )
        if snapshot:
            self.store.list_add("VM", vm, "snapshots", new_vm)
        else:
            self.store.list_add("VM", vm, "children", new_vm)
        return new_vm

    def vm__destroy(self, vm):
        rec = self.store.get("VM", vm)
        if rec["power_state"] == "Running":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "halted", "running")
        for vbd in rec["VBDs"]:
            self._drop_vbd(vbd, self.store.get("VBD", vbd))
        self._drop_vifs(rec)
        if rec["snapshot_of"] != NULL_REF:
            self.store.list_remove("VM", rec["snapshot_of"], "snapshots", vm)
        if rec["parent"] != NULL_REF:
            self.store.list_remove("VM", rec["parent"], "children", vm)
        for snap in rec["snapshots"]:
            if self.store.exists("VM", snap):
                self.store.update("VM", snap, snapshot_of=NULL_REF)
        self.store.delete("VM", vm)
        return ""
