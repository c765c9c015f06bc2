"""SR and VDI: the storage classes, CBT included.

Each SR has a backend (hostsim.sm.FileSR: real VHD files, SM-like snapshots and coalesce, CBT
logs), found by SR uuid in `Xapi.srs`; the VDI records are XAPI's view of its files
(`introduce_vdi`, `refresh_vdi` after a write or a coalesce, `forget_vdi`). Methods:
VDI.create, snapshot, clone, destroy; CBT: enable_cbt, disable_cbt, list_changed_blocks,
data_destroy (the VDI becomes cbt_metadata); VDI.get_nbd_info (xapi-nbd); SR.scan (one SM GC
pass). A QCOW2 VDI (XCP-ng 8.3) has sm_config `image-format: qcow2`; VDI.create takes that key to
make one (else the SR's default format, `hostsim serve --image-format`).
"""

import base64

from hostsim import errors as E
from hostsim.api.marshal import as_int
from hostsim.errors import XapiError
from hostsim.store import NULL_REF, new_uuid, xapi_time


def vdi_defaults(**kw):
    rec = {
        "uuid": new_uuid(),
        "name_label": "",
        "name_description": "",
        "SR": NULL_REF,
        "VBDs": [],
        "virtual_size": 0,
        "physical_utilisation": 0,
        "type": "user",
        "sharable": False,
        "read_only": False,
        "managed": True,
        "missing": False,
        "is_a_snapshot": False,
        "snapshot_of": NULL_REF,
        "snapshots": [],
        "snapshot_time": xapi_time(0),
        "sm_config": {},
        "other_config": {},
        "xenstore_data": {},
        "cbt_enabled": False,
        "location": "",
        "parent": NULL_REF,
        "storage_lock": False,
        "on_boot": "persist",
        "allow_caching": False,
        "metadata_of_pool": NULL_REF,
        "metadata_latest": False,
        "is_tools_iso": False,
        "tags": [],
        "allowed_operations": [],
        "current_operations": {},
    }
    rec.update(kw)
    return rec


class VDIMethods:
    """VDI.* and SR.* (a mixin of hostsim.api.Xapi)."""

    def sr_backend(self, sr_ref):
        uuid = self.store.field("SR", sr_ref, "uuid")
        return self.srs[uuid]

    def _vdi_backend(self, vdi):
        return self.sr_backend(self.store.field("VDI", vdi, "SR"))

    def _active_vbds(self, vdi):
        out = []
        for vbd in self.store.field("VDI", vdi, "VBDs"):
            rec = self.store.get("VBD", vbd)
            if rec["currently_attached"]:
                out.append(rec)
        return out

    def vdi__create(self, record):
        sr = record.get("SR", NULL_REF)
        backend = self.sr_backend(sr)
        size = as_int(record.get("virtual_size", 0), "virtual_size")
        image_format = (record.get("sm_config") or {}).get("image-format") or None
        uuid = backend.create(size, image_format=image_format)
        return self.introduce_vdi(
            sr,
            uuid,
            name_label=record.get("name_label", ""),
            name_description=record.get("name_description", ""),
            type=record.get("type", "user"),
            sharable=bool(record.get("sharable", False)),
            read_only=bool(record.get("read_only", False)),
            other_config=dict(record.get("other_config", {})),
        )

    def introduce_vdi(self, sr, uuid, **fields):
        backend = self.sr_backend(sr)
        info = backend.info(uuid)
        sm_config = {"vhd-parent": info["parent"]} if info["parent"] else {}
        if info.get("image_format", "vhd") != "vhd":
            sm_config["image-format"] = info["image_format"]
        rec = vdi_defaults(
            uuid=uuid,
            SR=sr,
            location=uuid,
            virtual_size=info["virtual_size"],
            physical_utilisation=info["physical_utilisation"],
            sm_config=sm_config,
            **fields,
        )
        ref = self.store.add("VDI", rec)
        self.store.list_add("SR", sr, "VDIs", ref)
        return ref

    def refresh_vdi(self, ref):
        """Re-read size, utilisation and vhd-parent of a VDI from its VHD file."""
        rec = self.store.get("VDI", ref)
        if rec["type"] == "cbt_metadata":
            return
        info = self._vdi_backend(ref).info(rec["uuid"])

        def fn(f):
            f["virtual_size"] = info["virtual_size"]
            f["physical_utilisation"] = info["physical_utilisation"]
            if info["parent"]:
                f["sm_config"]["vhd-parent"] = info["parent"]
            else:
                f["sm_config"].pop("vhd-parent", None)

        self.store.mutate("VDI", ref, fn)

    def _copy_vdi(self, vdi, snapshot):
        rec = self.store.get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise XapiError(E.VDI_INCOMPATIBLE_TYPE, vdi, "cbt_metadata")
        if snapshot and rec["sharable"]:
            raise XapiError(E.VDI_IS_SHARABLE, vdi)
        backend = self._vdi_backend(vdi)
        with backend.lock:
            new_uuid_, base_uuid = backend.snapshot(
                rec["uuid"], cbt=snapshot and rec["cbt_enabled"]
            )
            sr = rec["SR"]
            if base_uuid is not None:
                self.introduce_vdi(
                    sr,
                    base_uuid,
                    name_label="base copy",
                    managed=False,
                    read_only=True,
                )
            now = xapi_time()
            new = self.introduce_vdi(
                sr,
                new_uuid_,
                name_label=rec["name_label"],
                name_description=rec["name_description"],
                type=rec["type"],
                read_only=rec["read_only"] if not snapshot else False,
                is_a_snapshot=snapshot,
                snapshot_of=vdi if snapshot else NULL_REF,
                snapshot_time=now if snapshot else xapi_time(0),
                cbt_enabled=rec["cbt_enabled"] if snapshot else False,
                other_config=dict(rec["other_config"]),
            )
            self.refresh_vdi(vdi)
            if snapshot:
                self.store.list_add("VDI", vdi, "snapshots", new)
        return new

    def vdi__snapshot(self, vdi, driver_params):
        return self._copy_vdi(vdi, snapshot=True)

    def vdi__clone(self, vdi, driver_params):
        return self._copy_vdi(vdi, snapshot=False)

    def vdi__destroy(self, vdi):
        rec = self.store.get("VDI", vdi)
        if self._active_vbds(vdi):
            raise XapiError(E.VDI_IN_USE, vdi, "destroy")
        backend = self._vdi_backend(vdi)
        with backend.lock:
            for vbd in rec["VBDs"]:
                self._drop_vbd(vbd, self.store.get("VBD", vbd))
            backend.destroy(rec["uuid"])
            self.forget_vdi(vdi)
        backend.kick_gc()
        return ""

    def forget_vdi(self, vdi):
        rec = self.store.get("VDI", vdi)
        if rec["snapshot_of"] != NULL_REF:
            self.store.list_remove("VDI", rec["snapshot_of"], "snapshots", vdi)
        for snap in rec["snapshots"]:
            if self.store.exists("VDI", snap):
                self.store.update("VDI", snap, snapshot_of=NULL_REF)
        self.store.list_remove("SR", rec["SR"], "VDIs", vdi)
        self.store.delete("VDI", vdi)

    def _check_cbt_change(self, vdi, rec):
        if rec["is_a_snapshot"]:
            raise XapiError(E.OPERATION_NOT_ALLOWED, "VDI is a snapshot: " + vdi)
        if rec["type"] not in ("user", "system"):
            raise XapiError(E.VDI_INCOMPATIBLE_TYPE, vdi, rec["type"])

    def vdi__enable_cbt(self, vdi):
        rec = self.store.get("VDI", vdi)
        self._check_cbt_change(vdi, rec)
        if not rec["cbt_enabled"]:
            self._vdi_backend(vdi).enable_cbt(rec["uuid"])
            self.store.update("VDI", vdi, cbt_enabled=True)
        return ""

    def vdi__disable_cbt(self, vdi):
        rec = self.store.get("VDI", vdi)
        self._check_cbt_change(vdi, rec)
        if rec["cbt_enabled"]:
            self._vdi_backend(vdi).disable_cbt(rec["uuid"])
            self.store.update("VDI", vdi, cbt_enabled=False)
        return ""

    def vdi__list_changed_blocks(self, vdi_from, vdi_to):
        rec_from = self.store.get("VDI", vdi_from)
        rec_to = self.store.get("VDI", vdi_to)
        if rec_from["SR"] != rec_to["SR"]:
            raise XapiError(E.VDIS_ON_DIFFERENT_SRS, vdi_from, vdi_to)
        # XAPI's rule: refused while vdi_to is attached, unless only to VM snapshots.
        for vbd in self._active_vbds(vdi_to):
            if not self.store.field("VM", vbd["VM"], "is_a_snapshot"):
                raise XapiError(E.VDI_IN_USE, vdi_to, "list_changed_blocks")
        bitmap = self._vdi_backend(vdi_to).list_changed_blocks(rec_from["uuid"], rec_to["uuid"])
        return base64.b64encode(bitmap).decode("ascii")

    def vdi__data_destroy(self, vdi):
        rec = self.store.get("VDI", vdi)
        if not rec["is_a_snapshot"]:
            raise XapiError(E.OPERATION_NOT_ALLOWED, "VDI is not a snapshot: " + vdi)
        if not rec["cbt_enabled"]:
            raise XapiError(E.VDI_NO_CBT_METADATA, vdi)
        if rec["type"] == "cbt_metadata":
            return ""
        if self._active_vbds(vdi):
            raise XapiError(E.VDI_IN_USE, vdi, "data_destroy")
        backend = self._vdi_backend(vdi)
        with backend.lock:
            for vbd in rec["VBDs"]:
                self._drop_vbd(vbd, self.store.get("VBD", vbd))
            backend.data_destroy(rec["uuid"])
            self.store.mutate("VDI", vdi, _as_cbt_metadata)
        backend.kick_gc()
        return ""

    def vdi__get_nbd_info(self, vdi):
        rec = self.store.get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise XapiError(E.VDI_INCOMPATIBLE_TYPE, vdi, "cbt_metadata")
        exportname = "/%s?session_id=%s" % (rec["uuid"], self._current_session_ref)
        if self.host_nbd:  # several hosts: one entry per host that has the SR attached
            return [
                {
                    "exportname": exportname,
                    "address": self.host_nbd[h][0],
                    "port": self.host_nbd[h][1],
                    "cert": self.host_certificates.get(h, self.certificate_pem),
                    "subject": self.store.field("host", h, "hostname"),
                }
                for h in self.hosts_seeing([rec["SR"]])
                if h in self.host_nbd
            ]
        if self.nbd_address is None:
            return []
        host, port = self.nbd_address
        return [
            {
                "exportname": exportname,
                "address": host,
                "port": port,
                "cert": self.certificate_pem,
                "subject": self.cert_subject,
            }
        ]

    def sr__scan(self, sr):
        backend = self.sr_backend(sr)
        backend.gc_once()
        return ""


def _as_cbt_metadata(f):
    f["type"] = "cbt_metadata"
    f["physical_utilisation"] = 0
    f["sm_config"].pop("vhd-parent", None)
