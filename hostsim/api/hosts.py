"""host and pool: the methods of XAPI's host class, and where a VM may run.

A pool is one or several hosts (hostsim/host.py builds their records: each host with its
local SR's PBD, every host with the shared SR's PBD). `host.call_plugin` runs the plugins of
*that* host (its own PluginRunner: its /etc/xapi.d/plugins, its agent's config), as XAPI
forwards the call to the host named; a host without the plugin answers
XENAPI_MISSING_PLUGIN. `host.get_server_certificate` answers that host's certificate.
`hosts_seeing(srs)` is the placement rule VM.start/start_on/pool_migrate share: a VM may run
only on a host with a PBD, currently attached, of every SR its disks live on.
"""

from hostsim import errors as E
from hostsim.errors import XapiError
from hostsim.store import NULL_REF

API_VERSION_MAJOR = 2
API_VERSION_MINOR = 21


class HostMethods:
    """host.* (a mixin of hostsim.api.Xapi)."""

    def host__get_server_certificate(self, host):
        self.store.get("host", host)
        return self.host_certificates.get(host, self.certificate_pem)

    def host__call_plugin(self, host, plugin, fn, args):
        self.store.get("host", host)
        runner = self.host_plugins.get(host, self.plugins)
        if runner is None:
            raise XapiError(E.XENAPI_MISSING_PLUGIN, plugin)
        return runner.call(self._current_session_ref, plugin, fn, args)

    # -- placement -----------------------------------------------------------------------------

    def hosts_seeing(self, srs):
        """Refs of the hosts with an attached PBD of every SR in ``srs``, in host order."""
        st = self.store
        out = []
        for host in st.all_refs("host"):
            attached = set()
            for pbd in st.field("host", host, "PBDs"):
                rec = st.get("PBD", pbd)
                if rec["currently_attached"]:
                    attached.add(rec["SR"])
            if all(sr in attached for sr in srs):
                out.append(host)
        return out

    def vm_srs(self, vm):
        """The SRs of a VM's disks (VBDs of type Disk with a VDI), without repeats."""
        st = self.store
        out = []
        for vbd in st.field("VM", vm, "VBDs"):
            rec = st.get("VBD", vbd)
            if rec["VDI"] == NULL_REF or rec.get("type", "Disk") != "Disk":
                continue
            sr = st.field("VDI", rec["VDI"], "SR")
            if sr not in out:
                out.append(sr)
        return out

    def check_host_can_run(self, vm, host):
        """XAPI's VM_REQUIRES_SR when ``host`` cannot see one of the VM's SRs."""
        self.store.get("host", host)
        for sr in self.vm_srs(vm):
            if host not in self.hosts_seeing([sr]):
                raise XapiError(E.VM_REQUIRES_SR, vm, sr)

    def place_vm(self, vm):
        """Where VM.start puts a VM: its affinity host when that host can run it, else the
        host that can with the fewest resident VMs (XAPI weighs free memory; hostsim spreads)."""
        st = self.store
        eligible = self.hosts_seeing(self.vm_srs(vm))
        if not eligible:
            srs = self.vm_srs(vm)
            raise XapiError(E.VM_REQUIRES_SR, vm, srs[0] if srs else NULL_REF)
        affinity = st.field("VM", vm, "affinity")
        if affinity in eligible:
            return affinity
        return min(eligible, key=lambda h: len(st.field("host", h, "resident_VMs")))
