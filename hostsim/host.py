"""One simulated pool: a master host with a file SR, its XAPI server, and the glue between them."""

import logging
import os

from hostsim import certs
from hostsim.api import Xapi, vm_defaults
from hostsim.server import XapiHTTPServer
from hostsim.sm import FileSR
from hostsim.store import NULL_REF, new_uuid

log = logging.getLogger("hostsim.host")


class Pool:
    """Pool + host + SR records over a directory; `start()` serves XAPI on an HTTP(S) port."""

    def __init__(
        self,
        root,
        user="root",
        password="hostsim",
        sr_uuid=None,
        gc_interval=0,
        hostname="localhost",
        address="127.0.0.1",
    ):
        self.root = os.path.abspath(root)
        self.sr_root = os.path.join(self.root, "sr-mount")
        self.lock_dir = os.path.join(self.root, "lock-sm")
        self.cert_dir = os.path.join(self.root, "certs")
        os.makedirs(self.sr_root, exist_ok=True)
        self.api = Xapi(user=user, password=password)
        self.cert_pem, self.key_path, self.cert_path = certs.host_certificate(
            self.cert_dir, hostname, address
        )
        self.api.certificate_pem = self.cert_pem
        self.api.cert_subject = hostname
        self.address = address
        st = self.api.store
        self.pool_ref = st.add(
            "pool",
            {
                "name_label": "hostsim pool",
                "master": NULL_REF,
                "default_SR": NULL_REF,
                "other_config": {},
            },
        )
        self.host_ref = st.add(
            "host",
            {
                "name_label": hostname,
                "hostname": hostname,
                "address": address,
                "enabled": True,
                "API_version_major": 2,
                "API_version_minor": 21,
                "software_version": {
                    "product_brand": "XCP-ng",
                    "product_version": "8.3.0",
                    "xapi": "hostsim",
                },
                "PBDs": [],
                "resident_VMs": [],
                "other_config": {},
            },
        )
        self.api.host_ref = self.host_ref
        self.api.pool_ref = self.pool_ref
        st.update("pool", self.pool_ref, master=self.host_ref)
        self.sr_uuid = sr_uuid or new_uuid()
        self.sr = FileSR(
            self.sr_root, self.sr_uuid, lock_dir=self.lock_dir, listener=self._gc_action
        )
        self.sr_ref = st.add(
            "SR",
            {
                "uuid": self.sr_uuid,
                "name_label": "Local storage",
                "name_description": "hostsim file SR",
                "type": "ext",
                "content_type": "user",
                "shared": False,
                "VDIs": [],
                "PBDs": [],
                "physical_size": 1 << 40,
                "physical_utilisation": 0,
                "virtual_allocation": 0,
                "other_config": {},
                "sm_config": {"devserial": "hostsim"},
            },
        )
        self.api.srs[self.sr_uuid] = self.sr
        pbd = st.add(
            "PBD",
            {
                "host": self.host_ref,
                "SR": self.sr_ref,
                "device_config": {"location": self.sr.path},
                "currently_attached": True,
                "other_config": {},
            },
        )
        st.list_add("SR", self.sr_ref, "PBDs", pbd)
        st.list_add("host", self.host_ref, "PBDs", pbd)
        st.update("pool", self.pool_ref, default_SR=self.sr_ref)
        self.server = None
        self.nbd = None
        self.api.extensions["hostsim.write"] = self._ext_write
        self.api.extensions["hostsim.gc"] = self._ext_gc
        if gc_interval:
            self.sr.start_gc(gc_interval)

    # -- GC -> XAPI database (what SM does through XAPI after a coalesce) ------------------------

    def _vdi_ref(self, uuid):
        refs = self.api.store.where("VDI", uuid=uuid)
        return refs[0] if refs else None

    def _gc_action(self, action):
        api = self.api
        kind = action[0]
        if kind == "delete":
            ref = self._vdi_ref(action[1])
            if ref:
                api.forget_vdi(ref)
        elif kind == "coalesce":
            _, u, p, kids = action
            ref = self._vdi_ref(u)
            if ref:
                api.forget_vdi(ref)
            for k in [p, *kids]:
                r = self._vdi_ref(k)
                if r:
                    api.refresh_vdi(r)
        elif kind == "leaf-coalesce":
            _, leaf, p = action
            ref = self._vdi_ref(p)
            if ref:
                api.forget_vdi(ref)
            r = self._vdi_ref(leaf)
            if r:
                api.refresh_vdi(r)

    # -- building VMs --------------------------------------------------------------------------

    def create_vm(self, name, disk_sizes=(), template=False, running=False):
        st = self.api.store
        vm = st.add("VM", vm_defaults(name_label=name, is_a_template=template))
        for i, size in enumerate(disk_sizes):
            uuid = self.sr.create(size)
            vdi = self.api.introduce_vdi(self.sr_ref, uuid, name_label="%s disk %d" % (name, i))
            self.api._new_vbd(vm, vdi, str(i), "RW", i == 0)
        if running:
            self.api._set_power(vm, "Running")
        return vm

    def vm_vdis(self, vm):
        st = self.api.store
        out = []
        for vbd in st.field("VM", vm, "VBDs"):
            vdi = st.field("VBD", vbd, "VDI")
            if vdi != NULL_REF:
                out.append(vdi)
        return out

    # -- guest writes through the API (keeps XAPI's physical_utilisation current) ----------------

    def guest_write(self, vdi_ref, offset, data):
        uuid = self.api.store.field("VDI", vdi_ref, "uuid")
        self.sr.write(uuid, offset, data)

    def refresh(self, vdi_ref):
        self.api.refresh_vdi(vdi_ref)

    # -- hostsim's own API methods (used by the `hostsim write` CLI against a running pool) ---------

    def _ext_write(self, target, spec):
        """hostsim.write(session, VM or VDI ref, {pattern, count, length, seed, source, disk}):
        guest writes; returns {vdi uuid: [[offset, length], ...]}."""
        from hostsim import guest
        from hostsim.errors import XapiError

        st = self.api.store
        if st.exists("VM", target):
            vdis = self.vm_vdis(target)
            if "disk" in spec:
                vdis = [vdis[int(spec["disk"])]]
        elif st.exists("VDI", target):
            vdis = [target]
        else:
            raise XapiError("HANDLE_INVALID", "VM", target)
        source = spec.get("source")
        if source and st.exists("VM", source):
            source = self.vm_vdis(source)[0]
        out = {}
        for vdi in vdis:
            writes = guest.guest_write(
                self,
                vdi,
                pattern=spec.get("pattern", "mixed"),
                count=int(spec.get("count", 16)),
                length=int(spec.get("length", 64 << 10)),
                seed=int(spec.get("seed", 0)),
                source_vdi=source or None,
            )
            out[st.field("VDI", vdi, "uuid")] = [[o, n] for o, n in writes]
        return out

    def _ext_gc(self):
        return [list(a) for a in self.sr.gc_once()]

    # -- serving -------------------------------------------------------------------------------

    def start(self, listen=("127.0.0.1", 0), tls=False, nbd_listen=None):
        ctx = certs.server_context(self.cert_path, self.key_path) if tls else None
        self.server = XapiHTTPServer(listen, self.api, ssl_context=ctx)
        from hostsim import datapath, plugins

        datapath.install(self.server, self)
        if self.api.plugins is None:
            self.api.plugins = plugins.PluginRunner(
                os.path.join(self.root, "plugins"), self.server.url
            )
        else:
            self.api.plugins.xapi_url = self.server.url
        self.server.start()
        if nbd_listen is not None:
            from hostsim.xapinbd import XapiNbdServer

            self.nbd = XapiNbdServer(
                nbd_listen, self, certs.server_context(self.cert_path, self.key_path)
            )
            self.nbd.start()
            self.api.nbd_address = (self.address, self.nbd.port)
        return self.server.url

    def stop(self):
        if self.nbd is not None:
            self.nbd.stop()
            self.nbd = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.api.invalidate_all_sessions()
        self.sr.close()
