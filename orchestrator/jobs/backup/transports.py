"""Opening a disk's source: one transport (agent NBD or HTTP through a plugin ticket, xapi-nbd,
xapi-export) with what each can tell about changed blocks, "auto" trying them in order with
the reason for the one used, every disk of a VM opened in parallel, and closing them all
(sources closed, tickets revoked).
"""

from __future__ import annotations

import time
from typing import Any

from orchestrator.cliutil import CommandFailed, UsageError
from orchestrator.jobs.backup.context import (
    AgentUnavailable,
    BaseRefused,
    Disk,
    XapiContext,
    failure_text,
)
from orchestrator.jobs.backup.options import Tuning
from orchestrator.sources import AGENT_TRANSPORTS, AUTO_ORDER
from orchestrator.sources.base import Source, SourceUnavailable


def _source_kw(tuning: Tuning) -> dict[str, Any]:
    return {"retries": tuning.retries, "io_timeout": tuning.io_timeout}


def open_disk_source(ctx: XapiContext, disk: Disk, transport: str) -> tuple[Source, Any]:
    """Open ``disk`` with one transport; returns (source, plan). Falls back to full (and says
    so) when the transport refuses the base."""
    from orchestrator.sources.agent_http import AgentHttpSource
    from orchestrator.sources.agent_nbd import AgentNbdSource
    from orchestrator.sources.xapi_export import XapiExportSource
    from orchestrator.sources.xapi_nbd import XapiNbdSource

    tuning = ctx.tuning

    blocks = disk.cbt_blocks if disk.base_mode == "cbt" else None
    if transport in AGENT_TRANSPORTS:
        base = disk.agent_base if disk.base_mode == "agent" else None
        try:
            export = open_agent_export(ctx, disk, base, transport)
        except BaseRefused as exc:
            disk.notes.append(f"the agent refused base {base} ({exc}): full backup")
            disk.base_mode, disk.base_index = "full", None
            export = open_agent_export(ctx, disk, None, transport)
        disk.ticket = export.get("ticket")
        disk.export = export
        try:
            if transport == "nbd":
                src = AgentNbdSource.from_plugin(
                    export, connections=tuning.connections, depth=tuning.depth, **_source_kw(tuning)
                )
            else:
                if not (export.get("http") or {}).get("port"):
                    raise SourceUnavailable("the agent does not serve HTTP (no port)")
                src = AgentHttpSource.from_plugin(
                    export, streams=tuning.connections, **_source_kw(tuning)
                )
            plan = src.open(blocks)
        except BaseException:
            ctx.close_export(disk.ticket, export=export, host=disk.host)
            disk.ticket = disk.export = None
            raise
        return src, plan
    if transport == "xapi-nbd":
        if disk.base_mode == "agent":
            if disk.cbt:
                disk.notes.append("xapi-nbd: changed blocks from CBT")
                cbt_blocks(ctx, disk)
                blocks = disk.cbt_blocks if disk.base_mode == "cbt" else None
            else:
                disk.notes.append("xapi-nbd without CBT cannot tell what changed: full read")
                disk.base_mode = "full"
                disk.base_index = disk.base_index  # dedup still applies
        src = XapiNbdSource(
            ctx.x,
            disk.snap_ref,
            connections=tuning.connections,
            prefer_address=ctx.host_info(disk.host).get("address") if disk.host else None,
            **_source_kw(tuning),
        )
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


def open_agent_export(ctx: XapiContext, disk: Disk, base: str | None, transport: str) -> dict:
    """The plugin's open_export answer from the host the disk is routed to. When that host has
    no agent (no plugin, agent down) the router remembers it, and a disk on a shared SR moves
    to the next attached host (the note says so); a local SR has no other host:
    AgentUnavailable, and "auto" falls back to the XAPI way."""
    router = ctx.router
    while True:
        host = disk.host or ctx.host_ref()
        known = router.unavailable.get(host)
        try:
            if known is not None:
                raise AgentUnavailable(known)  # asked already in this job: no second call
            return ctx.open_export(disk.snap_uuid, base, transport, host)
        except AgentUnavailable as exc:
            why = failure_text(exc)
            router.mark_unavailable(host, why)
            alternatives = [
                h for h in (disk.route.alternatives if disk.route else ()) if h not in disk.tried
            ]
            disk.tried.append(host)
            usable = [h for h in alternatives if h not in router.unavailable]
            if not usable:
                raise
            new = usable[0]
            disk.notes.append(
                f"{router.name(host)} cannot open exports ({why}): read on {router.name(new)}"
            )
            router.moved(host, new)
            disk.host = new


def cbt_blocks(ctx: XapiContext, disk: Disk) -> None:
    """Changed blocks since the base snapshot from CBT (VDI.list_changed_blocks); a failure
    falls back to full, and says so."""
    from orchestrator.sources.xapi_nbd import changed_blocks_cbt

    try:
        base_ref = ctx.x.VDI.get_by_uuid(disk.base_snapshot)
        disk.cbt_blocks = changed_blocks_cbt(ctx.x, base_ref, disk.snap_ref, disk.size)
        disk.base_mode = "cbt"
    except Exception as exc:
        disk.notes.append(
            f"CBT from {disk.base_snapshot} failed ({failure_text(exc)}): full backup"
        )
        disk.base_mode, disk.base_index, disk.cbt_blocks = "full", None, None


def open_with_fallback(ctx: XapiContext, disk: Disk, transport: str):
    """Open ``disk`` with ``transport``, or with "auto" the first of AUTO_ORDER that works;
    returns (source, plan, why this transport)."""
    if transport != "auto":
        src, plan = open_disk_source(ctx, disk, transport)
        return src, plan, f"transport {transport} (asked for)"
    reasons = []
    for t in AUTO_ORDER:
        try:
            src, plan = open_disk_source(ctx, disk, t)
        except SourceUnavailable as exc:
            reasons.append(f"{t}: {failure_text(exc)}")
            continue
        why = "the agent answered" if t in AGENT_TRANSPORTS else "; ".join(reasons)
        return src, plan, f"transport {t} (auto: {why})"
    raise CommandFailed("no transport works for this disk: " + "; ".join(reasons))


def open_all(ctx: XapiContext, disks: list[Disk], transport: str) -> list[tuple]:
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
    sides = [ctx.side() for _d in disks]
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


def close_sources(ctx: XapiContext, disks: list[Disk], *, wait: bool = True):
    """Close every disk's source and revoke its ticket (all revocations in parallel). With
    ``wait=False`` returns the revoking threads for the caller to join."""
    threads = []
    for d in disks:
        if d.source is not None:
            try:
                d.source.close()
            except Exception:
                pass
        t = ctx.close_export_async(d.ticket, d.export, d.host)
        d.ticket = d.export = None
        if t is not None:
            threads.append(t)
    if wait:
        deadline = time.monotonic() + 10.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    return threads
