"""``fastpath backup vm`` and ``fastpath backup vdi``: a VM's disks (or one disk) into a repository.

backup vm (see DESIGN.md, Components and data flow)::

    1. find the VM, the previous restore point of it in the repository (its JSON names the
       snapshot each disk was read from: the base of this backup), remove snapshots an earlier
       interrupted run left behind ("[fastpath] …" snapshots that are not the base)
    2. enable CBT on the VM's disks when --cbt is given; VM.snapshot
    3. per disk, choose how to find what changed since the base:
         no restore point / base index or base snapshot gone / size changed  -> full
         base snapshot data-destroyed (cbt_metadata)  -> CBT (VDI.list_changed_blocks)
         agent (nbd, http): a ticket whose base is the base snapshot's parent VHD (XCP-ng
           snapshots are empty leaves over a hidden base; the new snapshot's chain contains
           that base, also after SM's GC coalesced it), the agent serves fastpath:changed
         xapi-export: export_raw_vdi?base=<base snapshot>;  xapi-nbd: CBT, else full
       a base that turns out unusable (the agent refuses it, CBT fails) falls back to full,
       and the job says so
    4. open every disk's source (--transport; auto: nbd, http, xapi-nbd, xapi-export, saying
       which one was used and why), pull all disks in parallel through the pipeline
    5. commit each disk's index, then the restore point's JSON (VM metadata, snapshots, stats)
    6. rotate: keep the new snapshot as the next base, destroy the previous one; with
       --cbt-purge, VDI.data_destroy the new snapshot's disks (only CBT metadata stays)

A failure or Ctrl-C at any point before 5 destroys the new snapshot and commits nothing (the
session's pending indexes are removed and its lease released), so the repository and the pool
are as before.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid as uuid_mod
from dataclasses import dataclass, field
from typing import Any

from orchestrator.cliutil import CommandFailed, UsageError, open_repo
from orchestrator.jobs import xapi_session
from orchestrator.jobs.pipeline import Cancelled, copy_disks
from orchestrator.progress import Progress
from orchestrator.repo.errors import NotFound, RepoError
from orchestrator.sources import AGENT_TRANSPORTS, AUTO_ORDER, TRANSPORTS
from orchestrator.sources.base import Source, SourceError, SourceUnavailable

SNAPSHOT_PREFIX = "[fastpath"


def snapshot_tag(repo) -> str:
    """Our snapshots are named ``[fastpath <repository id>] <time>``: a run only ever cleans up
    snapshots of its own repository (another repository may back up the same VM)."""
    return f"{SNAPSHOT_PREFIX} {repo.config.id[:12]}] "


NULL_REF = "OpaqueRef:NULL"


def register(registry) -> None:
    p = registry.add("vm", run_backup_vm, help="back up a VM through XAPI", group="backup")
    p.add_argument("vm", metavar="UUID", help="the VM's uuid")
    xapi_session.add_xapi_arguments(p)
    _repo_arguments(p)
    p.add_argument(
        "--transport",
        choices=(*TRANSPORTS, "auto"),
        default="auto",
        help="how to read the disks (default auto: the agent, else XAPI's NBD, else export)",
    )
    p.add_argument("--cbt", action="store_true", help="enable CBT on the VM's disks and use it")
    p.add_argument(
        "--cbt-purge",
        action="store_true",
        help="keep only CBT metadata of the snapshot (VDI.data_destroy) instead of its data",
    )
    p.add_argument("--full", action="store_true", help="force a full backup")
    _tuning_arguments(p)
    p.set_defaults(_render=_render)

    p = registry.add("vdi", run_backup_vdi, help="back up one disk (no XAPI)", group="backup")
    p.add_argument(
        "--source",
        required=True,
        metavar="SRC",
        help="nbd://host:port/export, nbds://…, https://agent/v1/exports/<ticket>, or FILE.vhd",
    )
    p.add_argument("--fingerprint", help="SHA-256 of the agent's TLS certificate (nbds/https)")
    p.add_argument("--vm", default="standalone", help="group name in the repository")
    p.add_argument("--vdi", help="disk uuid (default: from the source)")
    _repo_arguments(p)
    _tuning_arguments(p)
    p.set_defaults(_render=_render)


def _repo_arguments(p) -> None:
    p.add_argument("--repo", required=True, metavar="REPO", help="directory or s3://bucket/prefix")
    p.add_argument("--passphrase-file", metavar="FILE")
    p.add_argument("--concurrency-io", type=int, default=16, metavar="N")


def _tuning_arguments(p) -> None:
    p.add_argument("--connections", type=int, default=4, help="connections/streams per disk")
    p.add_argument("--depth", type=int, default=8, help="NBD requests in flight per connection")
    p.add_argument("--store-threads", type=int, default=8, help="chunk store threads per disk")
    p.add_argument("--parallel-disks", type=int, default=4)
    p.add_argument(
        "--read-ahead", type=int, default=16, help="blocks read ahead of the store, per disk"
    )
    p.add_argument("--retries", type=int, default=3, help="reconnects per connection")
    p.add_argument(
        "--io-timeout", type=float, default=60.0, help="seconds without an answer = failure"
    )


def _render(result: dict[str, Any]) -> str:
    lines = [f"restore point {result['id']}"]
    for d in result.get("disks", []):
        kind = "incremental" if d["incremental"] else "full"
        lines.append(
            f"  {d['vdi']}: {kind} via {d['transport']}, {d['bytes_read']} bytes read, "
            f"{d['stats'].get('bytes_written', 0)} bytes stored, {d['seconds']:.1f} s"
        )
        for n in d.get("notes", []):
            lines.append(f"    {n}")
    lines.append(
        f"  total {result['bytes_read']} bytes read, {result['bytes_written']} stored, "
        f"{result['seconds']:.1f} s"
    )
    return "\n".join(lines)


# -- per-disk work ----------------------------------------------------------------------------


@dataclass
class Disk:
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


class XapiContext:
    def __init__(self, session, target, args, ui: Progress):
        self.session = session
        self.x = session.xenapi
        self.target = target
        self.args = args
        self.ui = ui
        self.host = None

    def host_ref(self):
        if self.host is None:
            self.host = self.x.host.get_all()[0]
        return self.host

    def open_export(self, vdi: str, base: str | None, transports: str) -> dict:
        import json

        import XenAPI

        # The answer always carries the HTTP address too (one ticket serves both protocols):
        # the ticket is revoked there, by DELETE, when the backup is done.
        if "http" not in transports.split(","):
            transports += ",http"
        args = {"vdi": vdi, "transports": transports, "ttl": "86400"}
        if base:
            args["base"] = base
        try:
            text = self.x.host.call_plugin(self.host_ref(), "fastpath", "open_export", args)
        except XenAPI.Failure as exc:
            code = xapi_session.failure_code(exc)
            if code == "FASTPATH_OPEN_FAILED" and base:
                raise BaseRefused(" ".join(map(str, exc.details[1:]))) from None
            raise SourceUnavailable(f"agent plugin: {' '.join(map(str, exc.details))}") from None
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
        self, ticket: str | None, export: dict | None = None
    ) -> threading.Thread | None:
        """Revoke a ticket in the background (best effort; tickets expire anyway), on its own
        connection, so it overlaps the commit and the snapshot rotation. With the plugin's
        answer (``export``), straight at the agent: ``DELETE`` of the export's URL, as the
        ticket's holder, pinned to the agent's certificate (one HTTPS request instead of a
        plugin call, which XAPI runs as a new process); through the plugin if that fails."""
        if not ticket:
            return None
        host = self.host_ref()

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

    def close_export(self, ticket: str | None, wait: float = 10.0, export=None) -> None:
        """Revoke a ticket (best effort; a hung agent cannot hold the job: tickets expire)."""
        t = self.close_export_async(ticket, export)
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
    pass


def _source_kw(args) -> dict[str, Any]:
    return {"retries": args.retries, "io_timeout": args.io_timeout}


def open_disk_source(ctx: XapiContext, disk: Disk, transport: str) -> tuple[Source, Any]:
    """Open ``disk`` with one transport; returns (source, plan). Falls back to full (and says
    so) when the transport refuses the base."""
    args = ctx.args
    from orchestrator.sources.agent_http import AgentHttpSource
    from orchestrator.sources.agent_nbd import AgentNbdSource
    from orchestrator.sources.xapi_export import XapiExportSource
    from orchestrator.sources.xapi_nbd import XapiNbdSource

    blocks = disk.cbt_blocks if disk.base_mode == "cbt" else None
    if transport in AGENT_TRANSPORTS:
        base = disk.agent_base if disk.base_mode == "agent" else None
        try:
            export = ctx.open_export(disk.snap_uuid, base, transport)
        except BaseRefused as exc:
            disk.notes.append(f"the agent refused base {base} ({exc}): full backup")
            disk.base_mode, disk.base_index = "full", None
            export = ctx.open_export(disk.snap_uuid, None, transport)
        disk.ticket = export.get("ticket")
        disk.export = export
        try:
            if transport == "nbd":
                src = AgentNbdSource.from_plugin(
                    export, connections=args.connections, depth=args.depth, **_source_kw(args)
                )
            else:
                if not (export.get("http") or {}).get("port"):
                    raise SourceUnavailable("the agent does not serve HTTP (no port)")
                src = AgentHttpSource.from_plugin(
                    export, streams=args.connections, **_source_kw(args)
                )
            plan = src.open(blocks)
        except BaseException:
            ctx.close_export(disk.ticket, export=export)
            disk.ticket = disk.export = None
            raise
        return src, plan
    if transport == "xapi-nbd":
        if disk.base_mode == "agent":
            if disk.cbt:
                disk.notes.append("xapi-nbd: changed blocks from CBT")
                _cbt_blocks(ctx, disk)
                blocks = disk.cbt_blocks if disk.base_mode == "cbt" else None
            else:
                disk.notes.append("xapi-nbd without CBT cannot tell what changed: full read")
                disk.base_mode = "full"
                disk.base_index = disk.base_index  # dedup still applies
        src = XapiNbdSource(ctx.x, disk.snap_ref, connections=args.connections, **_source_kw(args))
        plan = src.open(blocks)
        if disk.base_mode == "full" and disk.base_index:
            plan.incremental = False
        return src, plan
    if transport == "xapi-export":
        base = disk.base_snapshot if disk.base_mode == "agent" else None
        if disk.base_mode == "cbt":
            disk.notes.append("xapi-export cannot use CBT: full export")
            disk.base_mode, disk.base_index = "full", None
        src = XapiExportSource(
            ctx.target.url,
            ctx.session._session,
            disk.snap_uuid,
            base_uuid=base,
            cafile=ctx.target.cafile,
        )
        plan = src.open(None)
        if base is None:
            disk.base_index = None  # a full export: nothing to merge onto
        return src, plan
    raise UsageError(f"unknown transport {transport!r}")


def _cbt_blocks(ctx: XapiContext, disk: Disk) -> None:
    from orchestrator.sources.xapi_nbd import changed_blocks_cbt

    try:
        base_ref = ctx.x.VDI.get_by_uuid(disk.base_snapshot)
        disk.cbt_blocks = changed_blocks_cbt(ctx.x, base_ref, disk.snap_ref, disk.size)
        disk.base_mode = "cbt"
    except Exception as exc:
        disk.notes.append(f"CBT from {disk.base_snapshot} failed ({_msg(exc)}): full backup")
        disk.base_mode, disk.base_index, disk.cbt_blocks = "full", None, None


def _msg(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if details:
        return " ".join(map(str, details))
    return str(exc) or type(exc).__name__


def open_with_fallback(ctx: XapiContext, disk: Disk, transport: str):
    if transport != "auto":
        src, plan = open_disk_source(ctx, disk, transport)
        return src, plan, f"transport {transport} (asked for)"
    reasons = []
    for t in AUTO_ORDER:
        try:
            src, plan = open_disk_source(ctx, disk, t)
        except SourceUnavailable as exc:
            reasons.append(f"{t}: {_msg(exc)}")
            continue
        why = "the agent answered" if t in AGENT_TRANSPORTS else "; ".join(reasons)
        return src, plan, f"transport {t} (auto: {why})"
    raise CommandFailed("no transport works for this disk: " + "; ".join(reasons))


# -- the job ----------------------------------------------------------------------------------


def _previous(repo, vm_uuid: str):
    points = repo.list_restore_points(vm_uuid)
    for point in reversed(points):
        try:
            return point, repo.read_metadata(point)
        except (RepoError, NotFound):
            continue
    return None, None


# What a restore needs to attach a disk as it was (restore --new-vm reads these).
VBD_KEPT_FIELDS = ("bootable", "mode", "unpluggable")


def _vm_disks(x, vm_ref) -> list[tuple[str, str, dict, dict]]:
    """(userdevice, VDI ref, VDI record, VBD record) of the VM's disks, by userdevice."""
    out = []
    for vbd in x.VM.get_VBDs(vm_ref):
        rec = x.VBD.get_record(vbd)
        if rec.get("type") != "Disk" or rec["VDI"] == NULL_REF:
            continue
        out.append((rec["userdevice"], rec["VDI"], x.VDI.get_record(rec["VDI"]), rec))
    out.sort(key=lambda t: t[0])
    return out


def vm_configuration(vm_rec: dict[str, Any]) -> dict[str, Any]:
    """The VM record's configuration a restore needs to create the VM again (restore
    --new-vm): identity, memory, vCPUs, boot, platform, NVRAM, BIOS strings...; no references
    into the pool and no runtime state (orchestrator/jobs/restore.py says what it copies)."""
    from orchestrator.jobs.restore import VM_COPIED_FIELDS

    keys = ("uuid", "name_label", "name_description", "other_config", "bios_strings")
    return {k: vm_rec[k] for k in (*keys, *VM_COPIED_FIELDS) if k in vm_rec}


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
            ui.log(f"could not destroy snapshot VM {snap_ref}: {_msg(exc)}")
    for vdi in vdis:
        try:
            x.VDI.destroy(vdi)
        except Exception as exc:
            if ui:
                ui.log(f"could not destroy snapshot disk {vdi}: {_msg(exc)}")


def _find_vm(x, uuid: str):
    import XenAPI

    try:
        return x.VM.get_by_uuid(uuid)
    except XenAPI.Failure as exc:
        raise CommandFailed(f"VM {uuid}: {_msg(exc)}") from None


class Phases:
    """Wall-clock seconds per step of a backup, for ``--json`` (``phases``) and the bench:
    where a command's time goes besides reading and storing data."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def mark(self, name: str) -> None:
        """The step ``name`` ended now (it began at the previous mark)."""
        now = time.monotonic()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 4)
        self._last = now


def run_backup_vm(args: argparse.Namespace, ui: Progress):
    if args.cbt_purge and args.transport == "xapi-export":
        raise UsageError("--cbt-purge needs CBT; xapi-export cannot use it")
    phases = Phases()
    target = xapi_session.resolve_target(args)
    session = xapi_session.connect(target)
    phases.mark("xapi_login")
    try:
        with open_repo(args) as repo:
            phases.mark("repo_open")
            result = _backup_vm(args, ui, session, target, repo, phases)
    finally:
        xapi_session.logout(session)
    phases.mark("close")
    result["phases"] = phases.seconds
    return result


def _backup_vm(args, ui: Progress, session, target, repo, phases: Phases) -> dict[str, Any]:
    started = time.monotonic()
    x = session.xenapi
    ctx = XapiContext(session, target, args, ui)
    vm_uuid = args.vm
    vm_ref = _find_vm(x, vm_uuid)
    vm_rec = x.VM.get_record(vm_ref)
    if vm_rec.get("is_a_snapshot") or vm_rec.get("is_a_template"):
        raise UsageError(f"{vm_uuid} is a snapshot or a template, not a VM")
    point, prev = (None, None) if args.full else _previous(repo, vm_uuid)
    prev_meta = (prev or {}).get("metadata", {})
    prev_snapshot = (prev_meta.get("snapshot") or {}).get("uuid")

    # The writer lease first: it protects the base index we read and tells a concurrent run
    # of the same VM that we are here.
    phases.mark("find_vm")
    backup_session = repo.begin_backup(vm_uuid)
    phases.mark("lease_and_lookup")
    try:
        _refuse_concurrent(repo, backup_session, vm_uuid)
        # Leftovers of an interrupted run: our snapshots that are not the current base.
        tag = snapshot_tag(repo)
        for snap in vm_rec.get("snapshots", []):
            try:
                srec = x.VM.get_record(snap)
            except Exception:
                continue
            if srec["name_label"].startswith(tag) and srec["uuid"] != prev_snapshot:
                ui.log(f"removing snapshot {srec['uuid']} left behind by an earlier run")
                destroy_snapshot(x, snap, ui)

        disks_live = _vm_disks(x, vm_ref)
        if not disks_live:
            raise CommandFailed(f"VM {vm_uuid} has no disks")
        if args.cbt or args.cbt_purge:
            for _dev, vdi_ref, rec, _vbd in disks_live:
                if not rec.get("cbt_enabled"):
                    x.VDI.enable_cbt(vdi_ref)
                    ui.log(f"CBT enabled on {rec['uuid']}")

        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        phases.mark("cleanup_and_cbt")
        snap_ref = x.VM.snapshot(vm_ref, f"{tag}{when}")
        snap_uuid = x.VM.get_uuid(snap_ref)
        phases.mark("snapshot")
        ui.log(f"snapshot {snap_uuid} of VM {vm_rec['name_label']} ({vm_uuid})")
    except BaseException:
        backup_session.abort()
        raise
    cancel = threading.Event()
    disks: list[Disk] = []
    try:
        by_origin = {}
        for dev, vdi_ref, rec, _vbd in _vm_disks(x, snap_ref):
            origin = rec.get("snapshot_of")
            by_origin[origin] = (dev, vdi_ref, rec)
        prev_disks = prev_meta.get("disks", {})
        for dev, live_ref, live, vbd in disks_live:
            if live_ref not in by_origin:
                raise CommandFailed(f"snapshot {snap_uuid} has no copy of disk {live['uuid']}")
            _d, sref, srec = by_origin[live_ref]
            disk = Disk(
                vdi_uuid=live["uuid"],
                vdi_ref=live_ref,
                snap_ref=sref,
                snap_uuid=srec["uuid"],
                size=int(srec["virtual_size"]),
                userdevice=dev,
                name=live["name_label"],
                cbt=bool(srec.get("cbt_enabled")),
                vbd={k: vbd[k] for k in VBD_KEPT_FIELDS if k in vbd},
            )
            _choose_base(ctx, repo, disk, point, prev_disks.get(live["uuid"]))
            disks.append(disk)
        phases.mark("choose_base")

        jobs = []
        total = 0
        opened = _open_all(ctx, disks, args.transport)
        phases.mark("open_exports")
        for disk, (src, plan, why) in zip(disks, opened):
            src.max_in_flight = max(1, args.read_ahead)
            kind = "incremental" if plan.incremental else "full"
            ui.log(
                f"disk {disk.vdi_uuid}: {why}; {kind}, {len(plan.blocks)} of "
                f"{plan.block_count} blocks to read"
                + (f" ({'; '.join(disk.notes)})" if disk.notes else "")
            )
            disk.notes.insert(0, why)
            writer = backup_session.disk_writer(
                disk.vdi_uuid,
                disk.vdi_uuid,
                plan.size,
                base=disk.base_index if plan.incremental else None,
                concurrency=args.store_threads,
            )
            total += plan.bytes_to_read
            jobs.append({"source": src, "plan": plan, "writer": writer, "vdi": disk.vdi_uuid})
        with ui.task(f"backup {vm_rec['name_label']}", total=total, unit="bytes") as task:
            for job in jobs:
                job["on_bytes"] = task.advance
            results = copy_disks(jobs, cancel=cancel, parallel=args.parallel_disks)
            task.done(f"{total} bytes read")
        phases.mark("data")
        metadata = {
            "source": "xapi",
            "xapi": target.url,
            "transport": args.transport,
            "vm": vm_configuration(vm_rec),
            "snapshot": {"uuid": snap_uuid, "time": when, "purged": bool(args.cbt_purge)},
            "disks": {
                d.vdi_uuid: {
                    "snapshot_vdi": d.snap_uuid,
                    "userdevice": d.userdevice,
                    **d.vbd,
                    "name_label": d.name,
                    "virtual_size": d.size,
                    "cbt": d.cbt,
                    "transport": r.transport,
                    "incremental": r.incremental,
                    "base_mode": d.base_mode,
                }
                for d, r in zip(disks, results)
            },
        }
        rp_id = backup_session.commit(metadata)
        phases.mark("commit")
    except BaseException as exc:
        cancel.set()
        backup_session.abort()
        _close_sources(ctx, disks)
        destroy_snapshot(x, snap_ref, ui)
        ui.log(f"backup of {vm_uuid} failed; snapshot {snap_uuid} removed, nothing committed")
        if isinstance(exc, Cancelled | KeyboardInterrupt):
            raise KeyboardInterrupt() from None
        if isinstance(exc, SourceError | RepoError | OSError):
            raise CommandFailed(f"backup of VM {vm_uuid} failed: {_msg(exc)}") from exc
        raise
    # Revoking the tickets (at the agent, else a plugin call each) overlaps the rotation;
    # joined before returning.
    revoking = _close_sources(ctx, disks, wait=False)
    _rotate(ctx, disks, snap_ref, prev_snapshot, args)
    phases.mark("rotate")
    deadline = time.monotonic() + 10.0
    for t in revoking:
        t.join(max(0.0, deadline - time.monotonic()))
    phases.mark("revoke")
    stats = backup_session.stats().to_json()
    return {
        "ok": True,
        "id": rp_id,
        "vm": vm_uuid,
        "snapshot": snap_uuid,
        "disks": [_disk_json(d, r) for d, r in zip(disks, results)],
        "bytes_read": sum(r.bytes_read for r in results),
        "bytes_written": stats["bytes_written"],
        "stats": stats,
        "seconds": round(time.monotonic() - started, 3),
    }


def _open_all(ctx: XapiContext, disks: list[Disk], transport: str) -> list[tuple]:
    """Open every disk's source: in parallel for a VM with several disks (each open is a
    plugin call, a TLS pinning and a block-status walk), each thread on its own connection of
    the same XAPI session. Sets ``disk.source`` as soon as a disk is open, so the caller's
    cleanup closes what was opened when another disk fails; raises the first failure."""

    def one(disk: Disk, side: XapiContext):
        src, plan, why = open_with_fallback(side, disk, transport)
        disk.source = src
        return src, plan, why

    if len(disks) <= 1:
        return [one(d, ctx) for d in disks]
    sides = []
    for _d in disks:
        side = XapiContext(ctx.session, ctx.target, ctx.args, ctx.ui)
        side.x = ctx.side_api()
        side.host = ctx.host_ref()
        sides.append(side)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(disks), 8), thread_name_prefix="open") as pool:
        futures = [pool.submit(one, d, side) for d, side in zip(disks, sides)]
        errors = []
        for f in futures:
            exc = f.exception()
            if exc is not None:
                errors.append(exc)
    if errors:
        raise errors[0]
    return [f.result() for f in futures]


def _refuse_concurrent(repo, session, vm_uuid: str) -> None:
    """Another live backup of this VM into this repository: refuse (its snapshot would look
    like a leftover to us, and two bases would race)."""
    from orchestrator.repo import locks

    for lease in locks.list_writer_leases(repo.backend):
        info = lease.body.get("info") or {}
        if lease.key == session.lease.key or info.get("vm") != vm_uuid or lease.expired():
            continue
        raise CommandFailed(
            f"another backup of VM {vm_uuid} into {repo.url} is running "
            f"(since {info.get('time', '?')}, host {lease.body.get('host', '?')}, "
            f"pid {lease.body.get('pid', '?')}); try again when it is done"
        )


def _disk_json(d: Disk, r) -> dict[str, Any]:
    return {
        "vdi": d.vdi_uuid,
        "snapshot_vdi": d.snap_uuid,
        "index": r.index_key,
        "transport": r.transport,
        "incremental": r.incremental,
        "base_mode": d.base_mode,
        "blocks_read": r.blocks_read,
        "bytes_read": r.bytes_read,
        "seconds": round(r.seconds, 3),
        "stats": r.stats,
        "notes": d.notes + [n for n in r.notes if n not in d.notes],
    }


def _close_sources(ctx: XapiContext, disks: list[Disk], *, wait: bool = True):
    """Close every disk's source and revoke its ticket (all revocations in parallel). With
    ``wait=False`` returns the revoking threads for the caller to join."""
    threads = []
    for d in disks:
        if d.source is not None:
            try:
                d.source.close()
            except Exception:
                pass
        t = ctx.close_export_async(d.ticket, d.export)
        d.ticket = d.export = None
        if t is not None:
            threads.append(t)
    if wait:
        deadline = time.monotonic() + 10.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    return threads


def _choose_base(ctx: XapiContext, repo, disk: Disk, point, prev: dict | None) -> None:
    x = ctx.x
    if point is None or prev is None:
        disk.notes.append("no earlier backup of this disk: full")
        return
    index_key = point.disks.get(disk.vdi_uuid)
    try:
        if index_key is None:
            raise NotFound("no index")
        base_index = repo.read_index(index_key)
    except (NotFound, RepoError) as exc:
        disk.notes.append(f"base index of {point.id} unusable ({exc}): full")
        return
    if base_index.virtual_size != disk.size:
        disk.notes.append("disk size changed since the base: full")
        return
    base_snap = prev.get("snapshot_vdi")
    try:
        base_ref = x.VDI.get_by_uuid(base_snap)
        base_rec = x.VDI.get_record(base_ref)
    except Exception:
        disk.notes.append(f"base snapshot {base_snap} is gone: full")
        return
    disk.base_index = index_key
    disk.base_snapshot = base_snap
    if base_rec.get("type") == "cbt_metadata":
        if not disk.cbt:
            disk.notes.append("base has only CBT metadata but CBT is off: full")
            disk.base_index = None
            return
        _cbt_blocks(ctx, disk)
        return
    parent = (base_rec.get("sm_config") or {}).get("vhd-parent")
    disk.base_mode = "agent"
    disk.agent_base = parent
    if not parent:
        disk.notes.append(f"base snapshot {base_snap} has no parent VHD: agent diff impossible")
        disk.base_mode = "export"  # xapi-export still diffs against the snapshot itself
        if disk.cbt:
            _cbt_blocks(ctx, disk)


def _rotate(ctx: XapiContext, disks: list[Disk], snap_ref: str, prev_snapshot, args) -> None:
    x, ui = ctx.x, ctx.ui
    if args.cbt_purge:
        for d in disks:
            try:
                x.VDI.data_destroy(d.snap_ref)
            except Exception as exc:
                ui.log(f"data_destroy of {d.snap_uuid} failed: {_msg(exc)}")
        ui.log("snapshot data destroyed; CBT metadata kept as the next base")
    if prev_snapshot:
        try:
            old = x.VM.get_by_uuid(prev_snapshot)
        except Exception:
            return
        if old != snap_ref:
            destroy_snapshot(x, old, ui)
            ui.log(f"previous snapshot {prev_snapshot} removed")


# -- backup vdi ---------------------------------------------------------------------------------


def run_backup_vdi(args: argparse.Namespace, ui: Progress):
    from orchestrator.sources.agent_http import AgentHttpSource
    from orchestrator.sources.agent_nbd import AgentNbdSource
    from orchestrator.sources.vhd_file import VhdFileSource

    started = time.monotonic()
    spec = args.source
    if spec.startswith(("nbd://", "nbds://")):
        src = AgentNbdSource.from_url(
            spec,
            fingerprint=args.fingerprint,
            connections=args.connections,
            depth=args.depth,
            retries=args.retries,
            io_timeout=args.io_timeout,
        )
        default_vdi = str(uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, spec))
    elif spec.startswith(("http://", "https://")):
        src = AgentHttpSource(
            spec,
            fingerprint=args.fingerprint,
            streams=args.connections,
            retries=args.retries,
            io_timeout=args.io_timeout,
        )
        default_vdi = None
    else:
        if not os.path.exists(spec):
            raise UsageError(f"{spec}: no such file (and not an nbd:// or https:// URL)")
        src = VhdFileSource(spec)
        default_vdi = None
    src.max_in_flight = max(1, args.read_ahead)
    with src, open_repo(args) as repo:
        plan = src.open(None)
        vdi = args.vdi or default_vdi
        if vdi is None:
            vdi = (getattr(src, "info", None) or {}).get("vdi") or getattr(src, "uuid", None)
        if vdi is None:
            raise UsageError("cannot tell the disk's uuid: give --vdi UUID")
        ui.log(f"{src.describe()}: {len(plan.blocks)} of {plan.block_count} blocks to read")
        cancel = threading.Event()
        with repo.begin_backup(args.vm) as session:
            writer = session.disk_writer(vdi, vdi, plan.size, concurrency=args.store_threads)
            with ui.task(f"backup {vdi}", total=plan.bytes_to_read, unit="bytes") as task:
                (result,) = copy_disks(
                    [
                        {
                            "source": src,
                            "plan": plan,
                            "writer": writer,
                            "vdi": vdi,
                            "on_bytes": task.advance,
                        }
                    ],
                    cancel=cancel,
                )
            rp_id = session.commit({"source": spec, "disks": {vdi: {"virtual_size": plan.size}}})
            stats = session.stats().to_json()
    result_json = {
        "vdi": vdi,
        "snapshot_vdi": None,
        "index": result.index_key,
        "transport": result.transport,
        "incremental": False,
        "base_mode": "full",
        "blocks_read": result.blocks_read,
        "bytes_read": result.bytes_read,
        "seconds": round(result.seconds, 3),
        "stats": result.stats,
        "notes": result.notes,
    }
    return {
        "ok": True,
        "id": rp_id,
        "vm": args.vm,
        "disks": [result_json],
        "bytes_read": result.bytes_read,
        "bytes_written": stats["bytes_written"],
        "stats": stats,
        "seconds": round(time.monotonic() - started, 3),
    }
