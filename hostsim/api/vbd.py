"""VBD: a VM's virtual block device, the link between a VM and a VDI (or an empty CD drive).

`VBD.create` checks what XAPI's xapi_vbd.ml checks; `_new_vbd` makes the record and links it
into the VM's and the VDI's VBDs (also used by VM.snapshot/clone and hostsim's pool builder);
`_drop_vbd` unlinks and deletes one (VM.destroy, VDI.destroy). A VBD is attached while its VM
runs (VM.start/shutdown set currently_attached, see hostsim/api/vm.py).
"""

from hostsim import errors as E
from hostsim.errors import XapiError
from hostsim.store import NULL_REF


class VBDMethods:
    """VBD.* (a mixin of hostsim.api.Xapi)."""

    def vbd__create(self, record):
        """XAPI's VBD.create (xapi_vbd.ml): the VDI's type must be attachable, CDs are read-only,
        only CDs may be empty, no RW VBD on a read-only VDI, userdevice unique in the VM."""
        if not isinstance(record, dict):
            raise XapiError(E.INTERNAL_ERROR, 'Failure("bad __structure")')
        vm = record.get("VM", NULL_REF)
        vdi = record.get("VDI", NULL_REF)
        vm_rec = self.store.get("VM", vm)
        vbd_type = record.get("type", "Disk")
        mode = record.get("mode", "RW")
        empty = bool(record.get("empty", vdi == NULL_REF))
        userdevice = str(record.get("userdevice", "0"))
        vdi_rec = None
        if not empty or vdi != NULL_REF:
            vdi_rec = self.store.get("VDI", vdi)
        if not empty and vdi_rec["type"] == "cbt_metadata":
            raise XapiError(E.VDI_INCOMPATIBLE_TYPE, vdi, vdi_rec["type"])
        if vbd_type == "CD" and mode != "RO":
            raise XapiError(E.VBD_CDS_MUST_BE_READONLY)
        if vbd_type != "CD" and empty:
            raise XapiError(E.VBD_NOT_REMOVABLE_MEDIA, "in constructor")
        if mode == "RW" and vdi_rec is not None and vdi_rec["read_only"]:
            raise XapiError(E.VDI_READONLY, vdi)
        if not userdevice.isdigit():
            raise XapiError(E.INVALID_DEVICE, userdevice)
        for other in vm_rec["VBDs"]:
            if self.store.field("VBD", other, "userdevice") == userdevice:
                raise XapiError(E.DEVICE_ALREADY_EXISTS, userdevice)
        return self._new_vbd(
            vm,
            vdi,
            userdevice=userdevice,
            mode=mode,
            bootable=bool(record.get("bootable", False)),
            vbd_type=vbd_type,
            empty=empty,
            unpluggable=bool(record.get("unpluggable", True)),
            other_config=dict(record.get("other_config", {})),
        )

    def _new_vbd(
        self,
        vm,
        vdi,
        userdevice="0",
        mode="RW",
        bootable=False,
        vbd_type="Disk",
        empty=None,
        unpluggable=True,
        other_config=None,
    ):
        running = self.store.field("VM", vm, "power_state") == "Running"
        ref = self.store.add(
            "VBD",
            {
                "VM": vm,
                "VDI": vdi,
                "device": "xvd" + chr(ord("a") + int(userdevice)) if userdevice.isdigit() else "",
                "userdevice": userdevice,
                "mode": mode,
                "type": vbd_type,
                "bootable": bootable,
                "empty": vdi == NULL_REF if empty is None else empty,
                "unpluggable": unpluggable,
                "currently_attached": running,
                "other_config": other_config or {},
                "allowed_operations": [],
                "current_operations": {},
            },
        )
        self.store.list_add("VM", vm, "VBDs", ref)
        if vdi != NULL_REF:
            self.store.list_add("VDI", vdi, "VBDs", ref)
        return ref

    def vbd__destroy(self, vbd):
        rec = self.store.get("VBD", vbd)
        if rec["currently_attached"]:
            raise XapiError(E.OPERATION_NOT_ALLOWED, "VBD is currently attached")
        self._drop_vbd(vbd, rec)
        return ""

    def _drop_vbd(self, vbd, rec):
        self.store.list_remove("VM", rec["VM"], "VBDs", vbd)
        if rec["VDI"] != NULL_REF:
            self.store.list_remove("VDI", rec["VDI"], "VBDs", vbd)
        self.store.delete("VBD", vbd)
