"""``backup vdi``: one disk into a repository without XAPI, from an agent's NBD or HTTP address
(a ticket made with ``fastpath-agent ticket create``) or a local VHD file; always a full read.
``vdi_source`` makes the source, ``backup_vdi`` pulls it into an open repository.
"""

from __future__ import annotations

import os
import threading
import time
import uuid as uuid_mod
from typing import Any

from orchestrator.cliutil import UsageError
from orchestrator.jobs.backup.options import Tuning
from orchestrator.jobs.pipeline import copy_disks
from orchestrator.progress import Progress
from orchestrator.sources.base import Source


def vdi_source(
    spec: str, fingerprint: str | None = None, tuning: Tuning | None = None
) -> tuple[Source, str | None]:
    """(source, default disk uuid or None) for ``spec``: ``nbd://``/``nbds://`` (the default
    uuid is derived from the URL), ``http://``/``https://`` (an agent's export), or a VHD file."""
    from orchestrator.sources.agent_http import AgentHttpSource
    from orchestrator.sources.agent_nbd import AgentNbdSource
    from orchestrator.sources.vhd_file import VhdFileSource

    tuning = tuning or Tuning()
    if spec.startswith(("nbd://", "nbds://")):
        src = AgentNbdSource.from_url(
            spec,
            fingerprint=fingerprint,
            connections=tuning.connections,
            depth=tuning.depth,
            retries=tuning.retries,
            io_timeout=tuning.io_timeout,
        )
        default_vdi = str(uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, spec))
    elif spec.startswith(("http://", "https://")):
        src = AgentHttpSource(
            spec,
            fingerprint=fingerprint,
            streams=tuning.connections,
            retries=tuning.retries,
            io_timeout=tuning.io_timeout,
        )
        default_vdi = None
    else:
        if not os.path.exists(spec):
            raise UsageError(f"{spec}: no such file (and not an nbd:// or https:// URL)")
        src = VhdFileSource(spec)
        default_vdi = None
    src.max_in_flight = max(1, tuning.read_ahead)
    return src, default_vdi


def backup_vdi(
    src: Source,
    repo,
    *,
    spec: str,
    vm: str = "standalone",
    vdi: str | None = None,
    tuning: Tuning | None = None,
    ui: Progress,
) -> dict[str, Any]:
    """Read all of ``src`` (entered by the caller) into ``repo`` as restore point of group
    ``vm``, disk ``vdi`` (default: what the source says); ``spec`` is recorded as the source.
    Returns the result ``fastpath backup vdi --json`` prints."""
    started = time.monotonic()
    tuning = tuning or Tuning()
    plan = src.open(None)
    if vdi is None:
        vdi = (getattr(src, "info", None) or {}).get("vdi") or getattr(src, "uuid", None)
    if vdi is None:
        raise UsageError("cannot tell the disk's uuid: give --vdi UUID")
    ui.log(f"{src.describe()}: {len(plan.blocks)} of {plan.block_count} blocks to read")
    cancel = threading.Event()
    with repo.begin_backup(vm, on_wait=ui.log) as session:
        writer = session.disk_writer(vdi, vdi, plan.size, concurrency=tuning.store_threads)
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
        "vm": vm,
        "disks": [result_json],
        "bytes_read": result.bytes_read,
        "bytes_written": stats["bytes_written"],
        "stats": stats,
        "seconds": round(time.monotonic() - started, 3),
    }
