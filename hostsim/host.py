"""One simulated pool: its hosts (the first is the master), each with a local file SR, a shared
SR when there are several hosts, the pool's XAPI server, and the glue between them."""

import logging
import os

from hostsim import certs
from hostsim.api import Xapi, vm_defaults
from hostsim.server import XapiHTTPServer
from hostsim.sm import FileSR
from hostsim.store import NULL_REF, new_uuid

log = logging.getLogger("hostsim.host")


class SimHost:
    """One host of the pool: its XAPI record, its local file SR (a PBD on this host only), its
    TLS certificate and the directory of its dom0 files (agent config, inventory, agent log)."""

    def __init__(self, index, ref, name, address, sr_root, sr, sr_ref, state_dir, cert):
        self.index = index
        self.ref = ref
        self.name = name
        self.address = address
        self.sr_root = sr_root
        self.sr = sr
        self.sr_ref = sr_ref
        self.state_dir = state_dir
        self.cert_pem, self.key_path, self.cert_path = cert

    @property
    def sr_uuid(self):
        return self.sr.uuid


class Pool:
    """Pool + hosts + SR records over a directory; `start()` serves XAPI on an HTTP(S) port.

    With ``hosts=1`` (the default): one master host with its local file SR in ``root/sr-mount``.
    With ``hosts=N``: N hosts (the first is the master), host ``i`` at address ``127.0.0.<i+1>``
    with its own local SR (host 0 in ``root/sr-mount``, the others in ``root/host<i+1>/sr-mount``)
    attached to it only, plus one shared SR (``root/shared-sr-mount``) with a PBD on every host.
    """

    def __init__(
        self,
        root,
        user="root",
        password="hostsim",
        sr_uuid=None,
        gc_interval=0,
        hostname="localhost",
        address="127.0.0.1",
        hosts=1,
    ):
        if hosts < 1:
            raise ValueError("a pool needs at least one host")
        self.root = os.path.abspath(root)
        self.lock_dir = os.path.join(self.root, "lock-sm")
        self.api = Xapi(user=user, password=password)
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
        self.api.pool_ref = self.pool_ref
        self.hosts = []
        for i in range(hosts):
            if hosts == 1:
                name, addr = hostname, address
            else:
                name, addr = "host%d" % (i + 1), "127.0.0.%d" % (i + 1)
            self.hosts.append(
                self._add_host(i, name, addr, sr_uuid if i == 0 else None, gc_interval)
            )
        master = self.hosts[0]
        self.host_ref = master.ref
        self.api.host_ref = master.ref
        self.address = master.address
        self.sr_root = master.sr_root
        self.sr = master.sr
        self.sr_uuid = master.sr_uuid
        self.sr_ref = master.sr_ref
        self.cert_dir = os.path.join(self.root, "certs")
        self.cert_pem, self.key_path, self.cert_path = (
            master.cert_pem,
            master.key_path,
            master.cert_path,
        )
        self.api.certificate_pem = self.cert_pem
        self.api.cert_subject = master.name
        st.update("pool", self.pool_ref, master=master.ref, default_SR=master.sr_ref)
        self.shared = None  # (sr_root, FileSR, SR ref) of the shared SR, when hosts > 1
        if hosts > 1:
            shared_root = os.path.join(self.root, "shared-sr-mount")
            sr = self._new_sr(shared_root, None, gc_interval)
            ref = self._sr_record(sr, "Shared storage", "hostsim shared file SR", True)
            for h in self.hosts:
                self._plug(h.ref, ref, sr)
            self.shared = (shared_root, sr, ref)
            st.update("pool", self.pool_ref, default_SR=ref)
        self.server = None
        self.nbd = None  # the master's xapi-nbd
        self.nbds = []  # every host's xapi-nbd
        self.api.extensions["hostsim.write"] = self._ext_write
        self.api.extensions["hostsim.gc"] = self._ext_gc

    def _add_host(self, index, name, address, sr_uuid, gc_interval):
        st = self.api.store
        state_dir = self.root if index == 0 else os.path.join(self.root, "host%d" % (index + 1))
        cert_dir = os.path.join(self.root, "certs" if index == 0 else "certs-host%d" % (index + 1))
        cert = certs.host_certificate(cert_dir, name, address)
        ref = st.add(
            "host",
            {
                "name_label": name,
                "name_description": "",
                "hostname": name,
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
        self.api.host_certificates[ref] = cert[0]
        sr_root = os.path.join(state_dir, "sr-mount")
        sr = self._new_sr(sr_root, sr_uuid, gc_interval)
        sr_ref = self._sr_record(sr, "Local storage", "hostsim file SR", False)
        self._plug(ref, sr_ref, sr)
        return SimHost(index, ref, name, address, sr_root, sr, sr_ref, state_dir, cert)

    def _new_sr(self, sr_root, sr_uuid, gc_interval):
        os.makedirs(sr_root, exist_ok=True)
        sr = FileSR(
            sr_root, sr_uuid or new_uuid(), lock_dir=self.lock_dir, listener=self._gc_action
        )
        self.api.srs[sr.uuid] = sr
        if gc_interval:
            sr.start_gc(gc_interval)
        return sr

    def _sr_record(self, sr, label, description, shared):
        return self.api.store.add(
            "SR",
            {
                "uuid": sr.uuid,
                "name_label": label,
                "name_description": description,
                "type": "nfs" if shared else "ext",
                "content_type": "user",
                "shared": shared,
                "VDIs": [],
                "PBDs": [],
                "physical_size": 1 << 40,
                "physical_utilisation": 0,
                "virtual_allocation": 0,
                "other_config": {},
                "sm_config": {"devserial": "hostsim"},
            },
        )

    def _plug(self, host_ref, sr_ref, sr):
        st = self.api.store
        pbd = st.add(
            "PBD",
            {
                "host": host_ref,
                "SR": sr_ref,
                "device_config": {"location": sr.path},
                "currently_attached": True,
                "other_config": {},
            },
        )
        st.list_add("SR", sr_ref, "PBDs", pbd)
        st.list_add("host", host_ref, "PBDs", pbd)
        return pbd

    def srs(self):
        """(SR ref, FileSR) of every SR of the pool: each host's local SR, then the shared one."""
        out = [(h.sr_ref, h.sr) for h in self.hosts]
        if self.shared is not None:
            out.append((self.shared[2], self.shared[1]))
        return out

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

    def create_vm(self, name, disk_sizes=(), template=False, running=False, sr_ref=None):
        """A VM with new empty disks on ``sr_ref`` (default: the master's local SR)."""
        st = self.api.store
        sr_ref = sr_ref or self.sr_ref
        backend = self.api.sr_backend(sr_ref)
        vm = st.add("VM", vm_defaults(name_label=name, is_a_template=template))
        for i, size in enumerate(disk_sizes):
            uuid = backend.create(size)
            vdi = self.api.introduce_vdi(sr_ref, uuid, name_label="%s disk %d" % (name, i))
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
        self.api._vdi_backend(vdi_ref).write(uuid, offset, data)

    def guest_read(self, vdi_ref, offset, length):
        uuid = self.api.store.field("VDI", vdi_ref, "uuid")
        return self.api._vdi_backend(vdi_ref).read(uuid, offset, length)

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
        return [list(a) for _ref, sr in self.srs() for a in sr.gc_once()]

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

            several = len(self.hosts) > 1
            for h in self.hosts:  # each host its own xapi-nbd, on its address, with its cert
                listen = nbd_listen if h.index == 0 else (h.address, 0)
                server = XapiNbdServer(
                    listen,
                    self,
                    certs.server_context(h.cert_path, h.key_path),
                    host=h.ref if several else None,
                )
                server.start()
                self.nbds.append(server)
                if several:
                    self.api.host_nbd[h.ref] = (h.address, server.port)
            self.nbd = self.nbds[0]
            self.api.nbd_address = (self.address, self.nbd.port)
        return self.server.url

    def stop(self):
        for server in self.nbds:
            server.stop()
        self.nbds = []
        self.nbd = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.api.invalidate_all_sessions()
        for _ref, sr in self.srs():
            sr.close()
