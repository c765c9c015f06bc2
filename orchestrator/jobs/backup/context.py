"""The XAPI side of a backup: the context a backup runs in (session, the hosts whose fastpath
plugin opens and closes export tickets, side connections), the Disk being backed up, VM/VDI
lookups and our snapshots (their name tag, their destruction).

Each disk is routed to the host that can read its SR (``XapiContext.route_disk``, the rules in
routing.py: a local SR's own host, a shared SR's resident host or the least loaded attached
one); its ticket is opened and closed on that host (``Disk.host``), and the agent's address
comes from that host's answer. The master (``XapiContext.host_ref``) is asked only when an SR
has no PBD.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from orchestrator.cliutil import CommandFailed
from orchestrator.jobs import xapi_session
from orchestrator.jobs.backup.options import Tuning
from orchestrator.jobs.backup.routing import Pbd, Route, Router
from orchestrator.progress import Progress
from orchestrator.sources.base import Source, SourceError, SourceUnavailable

SNAPSHOT_PREFIX = "[fastpath"


def snapshot_tag(repo) -> str:
    """Our snapshots are named ``[fastpath <repository id>] <time>``: a run only ever cleans up
    snapshots of its own repository (another repository may back up the same VM)."""
    return f"{SNAPSHOT_PREFIX} {repo.config.id[:12]}] "


NULL_REF = "OpaqueRef:NULL"


@dataclass
class Disk:
    """One disk of the VM being backed up, and how it is read (what changed since the base,
    through which transport)."""

    vdi_uuid: str  # the VM's disk (stable name in the repository)
    vdi_ref: str
    snap_ref: str
    snap_uuid: str
    size: int
    userdevice: str
    name: str
    cbt: bool
    base_index: str | None = None
    base_mode: str = "full"  # full | agent | cbt | export
    base_snapshot: str | None = None  # uuid of the base snapshot VDI
    agent_base: str | None = None  # uuid of the VHD the agent diffs against
    cbt_blocks: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    source: Source | None = None
    ticket: str | None = None
    export: dict | None = None  # the plugin's answer for ``ticket`` (addresses, fingerprint)
    vbd: dict = field(default_factory=dict)  # VBD_KEPT_FIELDS of the VM's VBD of this disk
    host: str | None = None  # ref of the host whose plugin opens (and closes) the ticket
    route: Route | None = None  # why that host, and the other hosts that can read the SR
    tried: list[str] = field(default_factory=list)  # refs of the hosts given up on (no agent)


# Plugin failures that say the host cannot open any export (no plugin, no agent running):
# the router skips that host for later shared-SR disks.
AGENT_DOWN_CODES = frozenset(
    {"XENAPI_MISSING_PLUGIN", "FASTPATH_AGENT_UNAVAILABLE", "XENAPI_PLUGIN_FAILURE"}
)


class AgentUnavailable(SourceUnavailable):
    """The host's fastpath plugin or agent is not there (not a refusal of this disk)."""


class XapiContext:
    """What a backup talks to XAPI with: the session, the host whose plugin opens the exports,
    side connections for other threads, and the tuning of the sources it opens."""

    def __init__(self, session, target, tuning: Tuning, ui: Progress, router: Router | None = None):
        self.session = session
        self.x = session.xenapi
        self.target = target
        self.tuning = tuning
        self.ui = ui
        self.host = None
        self.router = router if router is not None else Router()
        self.hosts: dict[str, dict] = {}  # host ref -> {"uuid", "name"}
        self.pbds: dict[str, list[Pbd]] = {}  # SR ref -> its PBDs

    def host_ref(self):
        """The pool master (asked when an SR has no PBD, and by default)."""
        if self.host is None:
            pool = self.x.pool.get_all()
            self.host = self.x.pool.get_master(pool[0]) if pool else self.x.host.get_all()[0]
        return self.host

    def side(self) -> XapiContext:
        """A context for another thread: its own connection, the same router and caches."""
        side = XapiContext(self.session, self.target, self.tuning, self.ui, self.router)
        side.x = self.side_api()
        side.host, side.hosts, side.pbds = self.host_ref(), self.hosts, self.pbds
        return side

    def host_info(self, host: str) -> dict:
        """{"uuid", "name", "address"} of a host (cached; the router names hosts in its
        reasons)."""
        info = self.hosts.get(host)
        if info is None:
            rec = self.x.host.get_record(host)
            info = {
                "uuid": rec["uuid"],
                "name": rec.get("name_label") or rec["uuid"],
                "address": rec.get("address"),
            }
            self.hosts[host] = info
            self.router.names[host] = info["name"]
        return info

    def route_disk(self, disk: Disk, sr_ref: str, resident: str | None) -> None:
        """Choose the host that reads ``disk`` (on SR ``sr_ref``; the VM resident on
        ``resident``) and record it on the disk."""
        pbds = self.pbds.get(sr_ref)
        if pbds is None:
            pbds = []
            for ref in self.x.SR.get_PBDs(sr_ref):
                rec = self.x.PBD.get_record(ref)
                pbds.append(Pbd(rec["host"], bool(rec.get("currently_attached"))))
            self.pbds[sr_ref] = pbds
        for p in pbds:
            self.host_info(p.host)
        if resident in (None, "", NULL_REF):
            resident = None
        else:
            self.host_info(resident)
        master = self.host_ref()
        self.host_info(master)
        disk.route = self.router.route(pbds, resident, master)
        disk.host = disk.route.host

    def open_export(
        self, vdi: str, base: str | None, transports: str, host: str | None = None
    ) -> dict:
        import json

        import XenAPI

        # The answer always carries the HTTP address too (one ticket serves both protocols):
        # the ticket is revoked there, by DELETE, when the backup is done.
        if "http" not in transports.split(","):
            transports += ",http"
        args = {"vdi": vdi, "transports": transports, "ttl": "86400"}
        if base:
            args["base"] = base
        host = host or self.host_ref()
        try:
            text = self.x.host.call_plugin(host, "fastpath", "open_export", args)
        except XenAPI.Failure as exc:
            code = xapi_session.failure_code(exc)
            if code == "FASTPATH_OPEN_FAILED" and base:
                raise BaseRefused(" ".join(map(str, exc.details[1:]))) from None
            text = " ".join(map(str, exc.details))
            where = self.hosts.get(host, {}).get("name", host)
            if code in AGENT_DOWN_CODES:
                raise AgentUnavailable(f"agent plugin on {where}: {text}") from None
            raise SourceUnavailable(f"agent plugin on {where}: {text}") from None
        return json.loads(text)

    def side_api(self):
        """Another XML-RPC connection on the same XAPI session, for calls made from another
        thread (an xmlrpc.client proxy is one HTTP connection: not shareable between threads).
        No second login: the session reference is reused."""
        import xmlrpc.client

        import XenAPI

        ctx = xapi_session.ssl_context(self.target)
        transport = xmlrpc.client.SafeTransport(context=ctx) if ctx is not None else None
        side = XenAPI.Session(self.target.url, transport=transport)
        side._session = self.session._session
        return side.xenapi

    def close_export_async(
        self, ticket: str | None, export: dict | None = None, host: str | None = None
    ) -> threading.Thread | None:
        """Revoke a ticket in the background (best effort; tickets expire anyway), on its own
        connection, so it overlaps the commit and the snapshot rotation. With the plugin's
        answer (``export``), straight at the agent: ``DELETE`` of the export's URL, as the
        ticket's holder, pinned to the agent's certificate (one HTTPS request instead of a
        plugin call, which XAPI runs as a new process); through the plugin of the host that
        opened it (``host``, default the master) if that fails."""
        if not ticket:
            return None
        host = host or self.host_ref()

        def call():
            if export is not None and _revoke_at_agent(export):
                return
            try:
                self.side_api().host.call_plugin(
                    host, "fastpath", "close_export", {"ticket": ticket}
                )
            except Exception:
                pass

        t = threading.Thread(target=call, name="close-export", daemon=True)
        t.start()
        return t

    def close_export(
        self, ticket: str | None, wait: float = 10.0, export=None, host: str | None = None
    ) -> None:
        """Revoke a ticket (best effort; a hung agent cannot hold the job: tickets expire)."""
        t = self.close_export_async(ticket, export, host)
        if t is not None:
            t.join(wait)


def _revoke_at_agent(export: dict, timeout: float = 3.0) -> bool:
    """DELETE the export at the agent's HTTP API; True when the agent says it is revoked."""
    from orchestrator.sources import httpclient

    url = (export.get("http") or {}).get("url")
    if not url:
        return False
    try:
        conn = httpclient.connect(url, export.get("fingerprint"), timeout)
        conn.connect()  # a firewalled port fails here, within the short timeout
        try:
            conn.request("DELETE", "/" + url.split("/", 3)[3])
            resp = conn.getresponse()
            resp.read(4096)
            return resp.status == 200
        finally:
            conn.close()
    except Exception:
        return False


class BaseRefused(SourceError):
    """The agent cannot diff against the base it was given (the caller falls back to full)."""


def failure_text(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if details:
        return " ".join(map(str, details))
    return str(exc) or type(exc).__name__


def vm_disks(x, vm_ref) -> list[tuple[str, str, dict, dict]]:
    """(userdevice, VDI ref, VDI record, VBD record) of the VM's disks, by userdevice."""
    out = []
    for vbd in x.VM.get_VBDs(vm_ref):
        rec = x.VBD.get_record(vbd)
        if rec.get("type") != "Disk" or rec["VDI"] == NULL_REF:
            continue
        out.append((rec["userdevice"], rec["VDI"], x.VDI.get_record(rec["VDI"]), rec))
    out.sort(key=lambda t: t[0])
    return out


def destroy_snapshot(x, snap_ref: str, ui: Progress | None = None) -> None:
    """Destroy a snapshot VM and its disks (best effort, each step on its own)."""
    vdis = []
    try:
        for vbd in x.VM.get_VBDs(snap_ref):
            vdi = x.VBD.get_VDI(vbd)
            if vdi != NULL_REF:
                vdis.append(vdi)
    except Exception:
        pass
    try:
        x.VM.destroy(snap_ref)
    except Exception as exc:
        if ui:
            ui.log(f"could not destroy snapshot VM {snap_ref}: {failure_text(exc)}")
    for vdi in vdis:
        try:
            x.VDI.destroy(vdi)
        except Exception as exc:
            if ui:
                ui.log(f"could not destroy snapshot disk {vdi}: {failure_text(exc)}")


def find_vm(x, uuid: str):
    import XenAPI

    try:
        return x.VM.get_by_uuid(uuid)
    except XenAPI.Failure as exc:
        raise CommandFailed(f"VM {uuid}: {failure_text(exc)}") from None
