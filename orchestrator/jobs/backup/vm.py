"""``backup vm`` as a function: ``backup_vm(session, target, repo, vm_uuid, options, ui=...)``
runs the whole flow of one VM (see orchestrator/jobs/backup/__init__.py: find the VM and its
base, snapshot, choose per disk how to find what changed, open and pull every disk, commit,
rotate the snapshots) and returns the result dict; ``fastpath backup vm`` (cli.py) is one
caller.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from orchestrator.cliutil import CommandFailed, UsageError
from orchestrator.jobs.backup.context import (
    Disk,
    XapiContext,
    destroy_snapshot,
    failure_text,
    find_vm,
    snapshot_tag,
    vm_disks,
)
from orchestrator.jobs.backup.options import VmBackupOptions
from orchestrator.jobs.backup.routing import Router
from orchestrator.jobs.backup.transports import cbt_blocks, close_sources, open_all
from orchestrator.jobs.pipeline import Cancelled, copy_disks
from orchestrator.jobs.vifplan import read_vifs
from orchestrator.jobs.vmrecord import VBD_KEPT_FIELDS, vm_configuration
from orchestrator.jobs.xapi_session import XapiTarget
from orchestrator.progress import Progress
from orchestrator.repo.errors import NotFound, RepoError
from orchestrator.sources import AGENT_TRANSPORTS
from orchestrator.sources.base import SourceError


def _previous(repo, vm_uuid: str):
    points = repo.list_restore_points(vm_uuid)
    for point in reversed(points):
        try:
            return point, repo.read_metadata(point)
        except (RepoError, NotFound):
            continue
    return None, None


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


def backup_vm(
    session,
    target: XapiTarget,
    repo,
    vm_uuid: str,
    options: VmBackupOptions | None = None,
    *,
    ui: Progress,
    phases: Phases | None = None,
    router: Router | None = None,
) -> dict[str, Any]:
    """Back up VM ``vm_uuid`` into ``repo`` (an open Repository); returns the result that
    ``fastpath backup vm --json`` prints (``id`` names the new restore point, ``phases`` the
    seconds per step).

    ``session`` is a logged-in XenAPI session on ``target`` (the pool master: URL, CA), used by
    this call only (an XenAPI proxy is one HTTP connection: backups running at once need one
    each); side connections for parallel work reuse its reference. ``router`` chooses the
    host that reads each disk (routing.py; a job shares one between its VMs so the load of
    shared SRs spreads over the pool); by default one for this call. Raises UsageError
    (the VM is a snapshot or a template, options that cannot work), CommandFailed (the backup
    failed: the new snapshot is removed and nothing is committed), KeyboardInterrupt.
    """
    options = options or VmBackupOptions()
    options.check()
    phases = phases or Phases()
    result = _backup_vm(session, target, repo, vm_uuid, options, ui, phases, router)
    result["phases"] = phases.seconds
    return result


def _backup_vm(
    session,
    target,
    repo,
    vm_uuid: str,
    options: VmBackupOptions,
    ui: Progress,
    phases: Phases,
    router: Router | None,
) -> dict[str, Any]:
    started = time.monotonic()
    x = session.xenapi
    tuning = options.tuning
    ctx = XapiContext(session, target, tuning, ui, router)
    vm_ref = find_vm(x, vm_uuid)
    vm_rec = x.VM.get_record(vm_ref)
    vifs = read_vifs(x, vm_ref)  # with the record: the VM may be gone by the commit
    if vm_rec.get("is_a_snapshot") or vm_rec.get("is_a_template"):
        raise UsageError(f"{vm_uuid} is a snapshot or a template, not a VM")
    last_point, last = _previous(repo, vm_uuid)
    # --full ignores the last restore point as a base, but its snapshot stays the base of the
    # next incremental until the new point is committed: a --full killed midway must not cost
    # the next backup a full read (it is removed by the rotation after the commit).
    point, prev = (None, None) if options.full else (last_point, last)
    prev_meta = (prev or {}).get("metadata", {})
    prev_snapshot = (((last or {}).get("metadata") or {}).get("snapshot") or {}).get("uuid")

    # The writer lease first: it protects the base index we read and tells a concurrent run
    # of the same VM that we are here.
    phases.mark("find_vm")
    backup_session = repo.begin_backup(vm_uuid, on_wait=ui.log)
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

        disks_live = vm_disks(x, vm_ref)
        if not disks_live:
            raise CommandFailed(f"VM {vm_uuid} has no disks")
        if options.cbt or options.cbt_purge:
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
        for dev, vdi_ref, rec, _vbd in vm_disks(x, snap_ref):
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
            ctx.route_disk(disk, srec["SR"], vm_rec.get("resident_on"))
            disks.append(disk)
        phases.mark("choose_base")

        jobs = []
        total = 0
        opened = open_all(ctx, disks, options.transport)
        phases.mark("open_exports")
        for disk, (src, plan, why) in zip(disks, opened):
            src.max_in_flight = max(1, tuning.read_ahead)
            kind = "incremental" if plan.incremental else "full"
            if plan.transport in AGENT_TRANSPORTS:
                why += f" on {ctx.host_info(disk.host)['name']} ({disk.route.why})"
            elif disk.route is not None:
                why += (
                    f"; route was {ctx.host_info(disk.host)['name']} ({disk.route.why}); "
                    f"read from {src.describe()}"
                )
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
                concurrency=tuning.store_threads,
            )
            total += plan.bytes_to_read
            jobs.append({"source": src, "plan": plan, "writer": writer, "vdi": disk.vdi_uuid})
        with ui.task(f"backup {vm_rec['name_label']}", total=total, unit="bytes") as task:
            for job in jobs:
                job["on_bytes"] = task.advance
            results = copy_disks(jobs, cancel=cancel, parallel=tuning.parallel_disks)
            task.done(f"{total} bytes read")
        phases.mark("data")
        metadata = {
            "source": "xapi",
            "xapi": target.url,
            "transport": options.transport,
            "vm": vm_configuration(vm_rec),
            "vifs": vifs,
            "snapshot": {"uuid": snap_uuid, "time": when, "purged": bool(options.cbt_purge)},
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
                    "host": _host_json(ctx, d, r)["uuid"],
                }
                for d, r in zip(disks, results)
            },
        }
        rp_id = backup_session.commit(metadata)
        phases.mark("commit")
    except BaseException as exc:
        cancel.set()
        backup_session.abort()
        close_sources(ctx, disks)
        destroy_snapshot(x, snap_ref, ui)
        ui.log(f"backup of {vm_uuid} failed; snapshot {snap_uuid} removed, nothing committed")
        if isinstance(exc, Cancelled | KeyboardInterrupt):
            raise KeyboardInterrupt() from None
        if isinstance(exc, SourceError | RepoError | OSError):
            raise CommandFailed(f"backup of VM {vm_uuid} failed: {failure_text(exc)}") from exc
        raise
    # Revoking the tickets (at the agent, else a plugin call each) overlaps the rotation;
    # joined before returning.
    revoking = close_sources(ctx, disks, wait=False)
    _rotate(ctx, disks, snap_ref, prev_snapshot, options.cbt_purge)
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
        "disks": [_disk_json(ctx, d, r) for d, r in zip(disks, results)],
        "bytes_read": sum(r.bytes_read for r in results),
        "bytes_written": stats["bytes_written"],
        "stats": stats,
        "seconds": round(time.monotonic() - started, 3),
    }


def _refuse_concurrent(repo, session, vm_uuid: str) -> None:
    """Another live backup of this VM into this repository: refuse (its snapshot would look
    like a leftover to us, and two bases would race)."""
    from orchestrator.repo import locks

    for lease in locks.list_writer_leases(repo.backend):
        info = lease.body.get("info") or {}
        if lease.key == session.lease.key or info.get("vm") != vm_uuid or lease.expired():
            continue  # expired(): also a holder on this machine that no longer runs
        raise CommandFailed(
            f"another backup of VM {vm_uuid} into {repo.url} is running "
            f"(since {info.get('time', '?')}, {lease.holder()}; its lease expires in "
            f"{max(0.0, lease.expires_in()):.0f} s unless it renews it); try again when it is done"
        )


def _host_json(ctx: XapiContext, d: Disk, r) -> dict[str, Any]:
    """The host that served the disk: its agent's (agent transports), else the host the disk
    was routed to (the XAPI way reads through XAPI; the route says which agent was missing)."""
    info = ctx.host_info(d.host) if d.host else {"uuid": None, "name": None}
    info = {"uuid": info["uuid"], "name": info["name"]}
    return {
        **info,
        "route": d.route.why if d.route else None,
        "agent": r.transport in AGENT_TRANSPORTS,
    }


def _disk_json(ctx: XapiContext, d: Disk, r) -> dict[str, Any]:
    return {
        "vdi": d.vdi_uuid,
        "host": _host_json(ctx, d, r),
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
        cbt_blocks(ctx, disk)
        return
    parent = (base_rec.get("sm_config") or {}).get("vhd-parent")
    disk.base_mode = "agent"
    disk.agent_base = parent
    if not parent:
        disk.notes.append(f"base snapshot {base_snap} has no parent VHD: agent diff impossible")
        disk.base_mode = "export"  # xapi-export still diffs against the snapshot itself
        if disk.cbt:
            cbt_blocks(ctx, disk)


def _rotate(
    ctx: XapiContext, disks: list[Disk], snap_ref: str, prev_snapshot, cbt_purge: bool
) -> None:
    x, ui = ctx.x, ctx.ui
    if cbt_purge:
        for d in disks:
            try:
                x.VDI.data_destroy(d.snap_ref)
            except Exception as exc:
                ui.log(f"data_destroy of {d.snap_uuid} failed: {failure_text(exc)}")
        ui.log("snapshot data destroyed; CBT metadata kept as the next base")
    if prev_snapshot:
        try:
            old = x.VM.get_by_uuid(prev_snapshot)
        except Exception:
            return
        if old != snap_ref:
            destroy_snapshot(x, old, ui)
            ui.log(f"previous snapshot {prev_snapshot} removed")
