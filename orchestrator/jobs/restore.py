"""``fastpath restore REPO ID|latest [--disk UUID] -o FILE.vhd|FILE.raw|-`` and ``--to-xapi``.

A restore point's disk index names one chunk per 2 MiB of the disk. Chunks are fetched in
parallel (bounded window, in order) and every one is checked against its index digest before a
byte of it is written (the codec verifies authenticated chunks; the plaintext digest is
recomputed here too, so a wrong chunk can never be restored silently).

Outputs:
- ``FILE.vhd``: a dynamic VHD streamed front to back by ``agent.vhd.VhdStreamLayout`` (BAT
  computed from the index: zero chunks stay unallocated), uuid = the disk's.
- ``FILE.raw`` (any other name): a sparse raw image (zero chunks are holes).
- ``-``: raw bytes on stdout (zeros written out).
- ``--to-xapi URL --sr UUID``: a new VDI per disk (``VDI.create``) filled through XAPI's
  ``PUT /import_raw_vdi?format=vhd`` with the same VHD stream; ``--new-vm NAME`` also creates a
  Halted VM from the backed-up VM record (``VM.create`` with the complete record XAPI requires;
  what the backup lacks gets a plain valid default, listed in the result's ``new_vm.defaults``)
  and attaches the new VDIs with their original userdevice (``VBD.create``). If the VM cannot be
  made, no half-made VM is left and the restored VDIs are kept and named.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode, urlparse

from orchestrator.cliutil import CommandFailed, UsageError, add_repo_argument, open_repo
from orchestrator.jobs import xapi_session
from orchestrator.jobs.job.names import resolve_point
from orchestrator.jobs.vifplan import parse_network_map, plan_vifs, vif_create_record
from orchestrator.jobs.vmrecord import vbd_create_record, vbd_plan, vm_create_record
from orchestrator.progress import Progress
from orchestrator.repo.codec import ZERO_DIGEST
from orchestrator.repo.errors import RepoError


def register(registry) -> None:
    p = registry.add("restore", run_restore, help="restore a disk or a VM from a restore point")
    add_repo_argument(p)
    p.add_argument(
        "id",
        metavar="ID",
        help="<vm>/<time> (from backup --json), <vm>/latest or latest; <vm>: uuid or name",
    )
    p.add_argument("--disk", metavar="UUID", help="the disk to restore (VDI uuid)")
    p.add_argument("-o", "--output", metavar="OUT", help="FILE.vhd, FILE.raw, a directory, or -")
    xapi_session.add_xapi_arguments(p, required_flag="--to-xapi")
    p.add_argument("--sr", metavar="UUID", help="SR for the new VDIs (with --to-xapi)")
    p.add_argument("--new-vm", metavar="NAME", help="also create a VM with the restored disks")
    p.add_argument(
        "--network",
        action="append",
        metavar="OLD=NEW",
        help="with --new-vm: put the VIFs of network OLD (uuid or name-label) on NEW (repeatable)",
    )
    p.add_argument(
        "--keep-macs", action="store_true", help="with --new-vm: keep the VIFs' MAC addresses"
    )
    p.add_argument(
        "--metadata-only",
        action="store_true",
        help="with --new-vm: create the VM and its VIFs, no disks",
    )
    p.add_argument("--threads", type=int, default=4, help="parallel chunk reads")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


class DiskReader:
    """Verified chunks of one index, fetched ``threads`` at a time, in order."""

    def __init__(self, repo, index, threads: int = 4):
        self.repo = repo
        self.index = index
        self.threads = max(1, threads)
        self.bytes = 0

    def _length(self, i: int) -> int:
        cs = self.index.chunk_size
        return min(cs, self.index.virtual_size - i * cs)

    def _fetch(self, i: int) -> bytes:
        digest = self.index.get(i)
        n = self._length(i)
        data = self.repo.read_chunk(digest, n)
        if digest != ZERO_DIGEST:
            if self.repo.codec.digest(data) != digest:
                raise RepoError(f"chunk {i} of disk {self.index.disk_uuid}: digest mismatch")
        return data

    def chunks(self, positions: list[int]) -> Iterator[tuple[int, bytes]]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="restore") as pool:
            window: deque = deque()
            it = iter(positions)
            for i in it:
                window.append((i, pool.submit(self._fetch, i)))
                if len(window) >= 2 * self.threads:
                    break
            while window:
                i, fut = window.popleft()
                data = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append((nxt, pool.submit(self._fetch, nxt)))
                self.bytes += len(data)
                yield i, data

    def nonzero(self) -> list[int]:
        return [i for i in range(len(self.index)) if self.index.get(i) != ZERO_DIGEST]


def vhd_layout(index, blocks: list[int]):
    from agent.vhd import VhdStreamLayout

    return VhdStreamLayout(
        index.virtual_size, blocks, index.chunk_size, uuid=_uuid(index.disk_uuid)
    )


def _uuid(text: str):
    import uuid

    return uuid.UUID(text)


def vhd_stream(reader: DiskReader, task=None) -> tuple[int, Iterator[bytes]]:
    """(total length, byte pieces) of the disk as a dynamic VHD."""
    blocks = reader.nonzero()
    layout = vhd_layout(reader.index, blocks)

    def gen():
        yield layout.prefix_bytes()
        for i, data in reader.chunks(blocks):
            yield layout.bitmap_bytes(i)
            yield data
            pad = layout.block_size - len(data) + layout.gap
            if pad:
                yield bytes(pad)
            if task is not None:
                task.advance(len(data))
        yield layout.suffix_bytes()

    return layout.total_length, gen()


def write_vhd(reader: DiskReader, path: str, task=None) -> int:
    total, pieces = vhd_stream(reader, task)
    tmp = f"{path}.part"
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return total


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_raw(reader: DiskReader, path: str, task=None) -> int:
    size = reader.index.virtual_size
    cs = reader.index.chunk_size
    tmp = f"{path}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            for i, data in reader.chunks(reader.nonzero()):
                os.pwrite(fd, data, i * cs)
                if task is not None:
                    task.advance(len(data))
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return size


def write_stdout(reader: DiskReader, task=None) -> int:
    out = sys.stdout.buffer
    for _i, data in reader.chunks(list(range(len(reader.index)))):
        out.write(data)
        if task is not None:
            task.advance(len(data))
    out.flush()
    return reader.index.virtual_size


def run_restore(args: argparse.Namespace, ui: Progress):
    if not args.output and not args.xapi:
        raise UsageError("give -o OUT (FILE.vhd, FILE.raw, DIR or -) or --to-xapi URL --sr UUID")
    if args.output and args.xapi:
        raise UsageError("-o and --to-xapi are exclusive")
    if args.new_vm and not args.xapi:
        raise UsageError("--new-vm needs --to-xapi URL --sr UUID")
    if (args.network or args.keep_macs or args.metadata_only) and not args.new_vm:
        raise UsageError("--network, --keep-macs and --metadata-only go with --new-vm NAME")
    try:
        args.network_map = parse_network_map(args.network)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.output == "-" and args.json:
        raise UsageError("-o - writes the disk on stdout: --json is not possible")
    started = time.monotonic()
    with open_repo(args) as repo:
        point = resolve_point(repo, args.id)
        meta = repo.read_metadata(point)
        disks = repo.point_disks(point, meta)  # authenticated: exactly the document's
        if args.disk:
            if args.disk not in disks:
                raise UsageError(
                    f"restore point {point.id} has no disk {args.disk} (disks: {', '.join(disks)})"
                )
            disks = {args.disk: disks[args.disk]}
        new_vm = None
        if args.xapi:
            out, new_vm = _restore_to_xapi(args, ui, repo, point, meta, disks)
        else:
            out = _restore_to_files(args, ui, repo, point, meta, disks)
    if args.output == "-":
        # stdout carries the disk: the summary goes to stderr
        ui.log(f"restored {point.id} to stdout ({out[0]['bytes']} bytes, verified)")
        return None
    result = {
        "ok": True,
        "id": point.id,
        "disks": out,
        "seconds": round(time.monotonic() - started, 3),
    }
    if new_vm is not None:
        result["new_vm"] = new_vm
    return result


def _restore_to_files(args, ui, repo, point, meta, disks) -> list[dict[str, Any]]:
    target = args.output
    is_dir = target != "-" and os.path.isdir(target)
    if len(disks) > 1 and not is_dir:
        raise UsageError(
            f"restore point {point.id} has {len(disks)} disks: choose one with --disk, or give "
            "a directory as -o"
        )
    paths = {vdi: os.path.join(target, f"{vdi}.vhd") if is_dir else target for vdi in disks}
    for path in paths.values():
        check_output_path(path, args.force)
    out = []
    for vdi, key in disks.items():
        index = repo.read_point_index(point, meta, vdi)
        reader = DiskReader(repo, index, args.threads)
        path = paths[vdi]
        with ui.task(f"restore {vdi}", total=index.virtual_size, unit="bytes") as task:
            if path == "-":
                written, fmt = write_stdout(reader, task), "raw"
            elif path.endswith(".vhd"):
                written, fmt = write_vhd(reader, path, task), "vhd"
            else:
                written, fmt = write_raw(reader, path, task), "raw"
        out.append(
            {
                "vdi": vdi,
                "index": key,
                "output": path,
                "format": fmt,
                "virtual_size": index.virtual_size,
                "bytes": written,
                "chunks_read": len(reader.nonzero()),
                "verified": True,
            }
        )
    return out


def check_output_path(path: str, force: bool) -> None:
    """Before any byte is read: the directory exists, and an existing file is only replaced
    with --force (never a directory or a device)."""
    if path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CommandFailed(f"cannot write {path}: directory {parent} does not exist")
    if os.path.lexists(path):
        if os.path.isdir(path) or not (os.path.isfile(path) or os.path.islink(path)):
            raise CommandFailed(f"cannot write {path}: it exists and is not a regular file")
        if not force:
            raise CommandFailed(f"{path} exists: give --force to overwrite it")


def _restore_to_xapi(args, ui, repo, point, meta, disks) -> tuple[list, dict | None]:
    import http.client

    import XenAPI

    if not args.sr and not args.metadata_only:
        raise UsageError("--to-xapi needs --sr UUID")
    target = xapi_session.resolve_target(args)
    session = xapi_session.connect(target)
    x = session.xenapi
    created = []
    out = []
    try:
        if not args.metadata_only:
            try:
                sr_ref = x.SR.get_by_uuid(args.sr)
            except XenAPI.Failure as exc:
                raise CommandFailed(f"SR {args.sr}: {' '.join(map(str, exc.details))}") from None
        dmeta = (meta.get("metadata") or {}).get("disks", {})
        for vdi, key in {} if args.metadata_only else disks.items():
            index = repo.read_point_index(point, meta, vdi)
            info = dmeta.get(vdi, {})
            name = info.get("name_label") or f"restored {vdi}"
            new_ref = x.VDI.create(
                {
                    "SR": sr_ref,
                    "virtual_size": str(index.virtual_size),
                    "name_label": f"{name} (restored {point.time})",
                    "name_description": f"fastpath restore of {point.id}",
                    "type": "user",
                    "sharable": False,
                    "read_only": False,
                    "other_config": {"fastpath-restore-of": f"{point.id}/{vdi}"},
                }
            )
            created.append(new_ref)
            new_uuid = x.VDI.get_uuid(new_ref)
            reader = DiskReader(repo, index, args.threads)
            with ui.task(f"import {vdi}", total=index.virtual_size, unit="bytes") as task:
                total, pieces = vhd_stream(reader, task)
                u = urlparse(target.url)
                if u.scheme == "https":
                    # The same trust as the XAPI session (--xapi-cafile / hostsim.json's CA).
                    conn = http.client.HTTPSConnection(
                        u.hostname, u.port, timeout=300, context=xapi_session.ssl_context(target)
                    )
                else:
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
                query = urlencode(
                    {"session_id": session._session, "vdi": new_uuid, "format": "vhd"}
                )
                try:
                    conn.putrequest("PUT", f"/import_raw_vdi?{query}")
                    conn.putheader("Content-Length", str(total))
                    conn.putheader("Content-Type", "application/octet-stream")
                    conn.endheaders()
                    for piece in pieces:
                        conn.send(piece)
                    resp = conn.getresponse()
                    body = resp.read(4096)
                finally:
                    conn.close()
                if resp.status // 100 != 2:
                    raise CommandFailed(
                        f"import_raw_vdi into {new_uuid}: HTTP {resp.status}: "
                        f"{body.decode('utf-8', 'replace').strip()[:300]}"
                    )
            out.append(
                {
                    "vdi": vdi,
                    "index": key,
                    "new_vdi": new_uuid,
                    "virtual_size": index.virtual_size,
                    "userdevice": info.get("userdevice"),
                    "verified": True,
                }
            )
    except BaseException:
        for ref in created:
            try:
                x.VDI.destroy(ref)
            except Exception:
                pass
        xapi_session.logout(session)
        raise
    try:
        if args.new_vm:
            vm_info = create_vm(
                x,
                args.new_vm,
                meta,
                point,
                out,
                ui,
                network_map=args.network_map,
                keep_macs=args.keep_macs,
            )
            for d in out:
                d["new_vm"] = vm_info["uuid"]
            return out, vm_info
    finally:
        xapi_session.logout(session)
    return out, None


# -- --new-vm: VM.create + VBD.create (the records: orchestrator/jobs/vmrecord.py) ---------------


def _kept(disks: list[dict[str, Any]]) -> str:
    return ", ".join(f"{d['new_vdi']} (disk {d['vdi']})" for d in disks)


def create_vm(
    x,
    name: str,
    meta: dict,
    point,
    disks: list[dict[str, Any]],
    ui=None,
    *,
    network_map: dict[str, str] | None = None,
    keep_macs: bool = False,
) -> dict:
    """Create VM ``name`` from the backed-up VM record with the restored disks attached and
    its VIFs on the networks ``plan_vifs`` maps them to (orchestrator/jobs/vifplan.py).

    A failure leaves no half-made VM (it is destroyed, its VBDs with it) and keeps the restored
    VDIs; the error names them.
    """
    import XenAPI

    md = meta.get("metadata") or {}
    vm_meta = md.get("vm") or {}
    record, defaulted = vm_create_record(name, vm_meta, point.id)
    plan = vbd_plan(disks, md.get("disks") or {})
    vif_plan, unmapped, unused = plan_vifs(
        md.get("vifs") or [], x.network.get_all_records(), network_map or {}, keep_macs
    )
    result = {"id": point.id, "disks": disks, "kept_vdis": [d["new_vdi"] for d in disks]}
    try:
        vm = x.VM.create(record)
    except XenAPI.Failure as exc:
        raise CommandFailed(
            f"cannot create VM {name!r}: VM.create: {' '.join(map(str, exc.details))}; no VM "
            f"was created; the restored disks are kept: {_kept(disks)}",
            result,
        ) from None
    step = "VM.get_uuid"
    try:
        vm_uuid = x.VM.get_uuid(vm)
        vbds = []
        for p in plan:
            step = f"VBD.create for disk {p['vdi']} (userdevice {p['userdevice']})"
            x.VBD.create(vbd_create_record(vm, x.VDI.get_by_uuid(p["new_vdi"]), p))
            vbds.append(p)
        vifs = []
        for v in vif_plan:
            step = f"VIF.create for device {v['device']} on network {v['network_uuid']}"
            ref = x.VIF.create(vif_create_record(vm, v))
            vifs.append({**v, "MAC": x.VIF.get_MAC(ref)})
    except BaseException as exc:
        why = " ".join(map(str, exc.details)) if isinstance(exc, XenAPI.Failure) else repr(exc)
        try:
            x.VM.destroy(vm)
            cleaned = "the half-made VM was destroyed"
        except Exception as exc2:  # say exactly what is left behind
            cleaned = f"the half-made VM {vm} could NOT be destroyed ({exc2}); remove it by hand"
        if isinstance(exc, KeyboardInterrupt):
            if ui is not None:
                ui.log(f"interrupted: {cleaned}; the restored disks are kept: {_kept(disks)}")
            raise
        raise CommandFailed(
            f"cannot create VM {name!r}: {step}: {why}; {cleaned}; the restored disks are "
            f"kept: {_kept(disks)}",
            result,
        ) from None
    notes = []
    bios = vm_meta.get("bios_strings")
    if bios:
        try:
            x.VM.set_bios_strings(vm, {str(k): str(v) for k, v in bios.items()})
        except XenAPI.Failure as exc:
            notes.append(f"BIOS strings not set: {' '.join(map(str, exc.details))}")
    if defaulted and ui is not None:
        ui.log(f"VM {name}: not in the backup, defaults used for: {', '.join(defaulted)}")
    for u in unmapped:
        notes.append(f"{u['vif']} not created: {u['reason']}")
    for k in unused:
        notes.append(f"--network {k}=...: no VIF of the backup is on network {k!r}")
    if ui is not None:
        for n in notes:
            ui.log(f"VM {name}: {n}")
    return {
        "uuid": vm_uuid,
        "name": name,
        "restored_from": vm_meta.get("uuid"),
        "vbds": vbds,
        "vifs": vifs,
        "unmapped_vifs": unmapped,
        "defaults": defaulted,
        "notes": notes,
    }
