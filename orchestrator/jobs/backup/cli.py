"""``fastpath backup vm`` and ``fastpath backup vdi`` on the command line: their arguments, the
options they make (``tuning``, ``vm_options``), the runners that call ``backup_vm`` and
``backup_vdi``, and the text rendering of a result (``--json`` prints it as it is).
"""

from __future__ import annotations

import argparse
import time
import uuid as uuid_mod
from typing import Any

from orchestrator.cliutil import UsageError, add_safety_arguments, open_repo
from orchestrator.jobs import xapi_session
from orchestrator.jobs.backup.options import Tuning, VmBackupOptions
from orchestrator.jobs.job.selection import resolve_vm
from orchestrator.progress import Progress
from orchestrator.sources import TRANSPORTS


def register(registry) -> None:
    p = registry.add("vm", run_backup_vm, help="back up a VM through XAPI", group="backup")
    p.add_argument("vm", metavar="VM", help="the VM's uuid or its name-label (when unique)")
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
    add_safety_arguments(p, legacy=False)  # a version 1 encrypted repository is read only


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
        host = (d.get("host") or {}).get("name")
        on = f" on {host}" if host else ""
        lines.append(
            f"  {d['vdi']}: {kind} via {d['transport']}{on}, {d['bytes_read']} bytes read, "
            f"{d['stats'].get('bytes_written', 0)} bytes stored, {d['seconds']:.1f} s"
        )
        for n in d.get("notes", []):
            lines.append(f"    {n}")
    lines.append(
        f"  total {result['bytes_read']} bytes read, {result['bytes_written']} stored, "
        f"{result['seconds']:.1f} s"
    )
    return "\n".join(lines)


def tuning(args: argparse.Namespace) -> Tuning:
    return Tuning(
        connections=args.connections,
        depth=args.depth,
        store_threads=args.store_threads,
        parallel_disks=args.parallel_disks,
        read_ahead=args.read_ahead,
        retries=args.retries,
        io_timeout=args.io_timeout,
    )


def vm_options(args: argparse.Namespace) -> VmBackupOptions:
    return VmBackupOptions(
        transport=args.transport,
        cbt=args.cbt,
        cbt_purge=args.cbt_purge,
        full=args.full,
        tuning=tuning(args),
    )


def run_backup_vm(args: argparse.Namespace, ui: Progress):
    from orchestrator.jobs.backup.vm import Phases, backup_vm  # the pipeline: not for --help

    options = vm_options(args)
    options.check()
    phases = Phases()
    target = xapi_session.resolve_target(args)
    session = xapi_session.connect(target)
    phases.mark("xapi_login")
    try:
        with open_repo(args) as repo:
            phases.mark("repo_open")
            vm_uuid = resolve_vm(session.xenapi, args.vm)
            result = backup_vm(session, target, repo, vm_uuid, options, ui=ui, phases=phases)
    finally:
        xapi_session.logout(session)
    phases.mark("close")
    result["phases"] = phases.seconds
    return result


def run_backup_vdi(args: argparse.Namespace, ui: Progress):
    from orchestrator.jobs.backup.vdi import backup_vdi, vdi_source

    started = time.monotonic()
    t = tuning(args)
    if args.vdi is not None:
        try:
            uuid_mod.UUID(args.vdi)
        except ValueError:
            raise UsageError(
                f"--vdi {args.vdi!r} is not a UUID: give the disk's uuid (xe vdi-list, "
                "hostsim info), or leave --vdi out to take it from the source"
            ) from None
    src, default_vdi = vdi_source(args.source, args.fingerprint, t)
    with src, open_repo(args) as repo:
        result = backup_vdi(
            src, repo, spec=args.source, vm=args.vm, vdi=args.vdi or default_vdi, tuning=t, ui=ui
        )
    result["seconds"] = round(time.monotonic() - started, 3)
    return result
