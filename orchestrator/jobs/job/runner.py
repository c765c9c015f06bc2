"""``fastpath job run``: back up every VM a job selects, at most ``max-vms`` at once and
``max-per-host`` per resident host (a halted VM counts against the pseudo-host ""), each VM on
its own XAPI session (a XenAPI proxy is one HTTP connection) and its own repository handle; a
VM that fails is a failed row, never a stop. Then the job's retention on the job's VMs only,
then the report (orchestrator/jobs/job/sinks.py writes it out).
"""

from __future__ import annotations

import threading
import time
from argparse import Namespace
from typing import Any

from orchestrator.cliutil import check_copy_ends, open_repo, passphrase_given
from orchestrator.jobs import xapi_session
from orchestrator.jobs.backup.options import Tuning, VmBackupOptions
from orchestrator.jobs.backup.vm import backup_vm
from orchestrator.jobs.job.selection import SelectedVm
from orchestrator.jobs.prune import run_prune
from orchestrator.progress import Progress
from orchestrator.sources import AGENT_TRANSPORTS


class HostSlots:
    """Hands out VMs so that at most ``max_total`` run at once and ``max_per_host`` per host,
    taking the first waiting VM whose host has room (a busy host never blocks the others)."""

    def __init__(self, vms: list[SelectedVm], max_total: int, max_per_host: int):
        self.pending = list(vms)
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.running: dict[str, int] = {}
        self.cond = threading.Condition()

    def take(self) -> SelectedVm | None:
        with self.cond:
            while True:
                if not self.pending:
                    return None
                if sum(self.running.values()) < self.max_total:
                    for i, vm in enumerate(self.pending):
                        if self.running.get(vm.host, 0) < self.max_per_host:
                            self.running[vm.host] = self.running.get(vm.host, 0) + 1
                            return self.pending.pop(i)
                self.cond.wait()

    def release(self, vm: SelectedVm) -> None:
        with self.cond:
            self.running[vm.host] -= 1
            self.cond.notify_all()


def _force_full(repo, vm_uuid: str, every: int) -> bool:
    """``full-every N``: True when the last N-1 restore points of the VM are all
    incremental (so this run is the Nth since a full), or there are fewer than N-1."""
    if every <= 0:
        return False
    if every == 1:
        return True
    points = repo.list_restore_points(vm_uuid)[-(every - 1) :]
    if len(points) < every - 1:
        return False
    for p in points:
        try:
            disks = repo.read_metadata(p).get("metadata", {}).get("disks", {})
        except Exception:
            return False
        if not disks or not all(d.get("incremental") for d in disks.values()):
            return False
    return True


def _row(vm: SelectedVm) -> dict[str, Any]:
    return {
        "vm": vm.uuid,
        "name": vm.name,
        "host": vm.host,
        "selected_by": vm.why,
        "result": "failed",
        "error": None,
        "id": None,
        "transport": None,
        "why": None,
        "kind": None,
        "bytes_read": 0,
        "bytes_stored": 0,
        "read_on": None,
        "disks": [],
        "seconds": 0.0,
        "started": None,
        "ended": None,
    }


def _disk_row(d: dict[str, Any]) -> dict[str, Any]:
    """Which host read one disk, through which transport, and why (the report's per-disk row)."""
    host = d.get("host") or {}
    notes = d.get("notes") or []
    return {
        "vdi": d["vdi"],
        "snapshot_vdi": d.get("snapshot_vdi"),
        "host": host.get("name"),
        "host_uuid": host.get("uuid"),
        "route": host.get("route"),
        "transport": d["transport"],
        "incremental": d["incremental"],
        "seconds": d["seconds"],
        "why": "; ".join(notes),
    }


def backup_one(job, target, vm: SelectedVm, ui: Progress, router=None) -> dict[str, Any]:
    """One VM of the job: its row of the report (never raises but KeyboardInterrupt).
    ``router`` (routing.Router) is the job's: which host reads each disk."""
    row = _row(vm)
    row["started"] = time.time()
    t0 = time.monotonic()
    try:
        session = xapi_session.connect(target)
        try:
            args = Namespace(repo=job.repository, passphrase_file=job.passphrase_file)
            with open_repo(args) as repo:
                options = VmBackupOptions(
                    transport=job.transport,
                    cbt=job.cbt,
                    full=_force_full(repo, vm.uuid, job.full_every),
                    tuning=Tuning(io_timeout=job.io_timeout),
                )
                result = backup_vm(session, target, repo, vm.uuid, options, ui=ui, router=router)
        finally:
            xapi_session.logout(session)
        disks = result.get("disks", [])
        transports = sorted({d["transport"] for d in disks})
        row.update(
            result="ok",
            id=result["id"],
            transport=",".join(transports),
            why="; ".join(dict.fromkeys((d.get("notes") or [""])[0] for d in disks)),
            kind="incremental" if disks and all(d["incremental"] for d in disks) else "full",
            bytes_read=result["bytes_read"],
            bytes_stored=result["bytes_written"],
            disks=[_disk_row(d) for d in disks],
            read_on=",".join(
                dict.fromkeys((d.get("host") or {}).get("name") or "?" for d in disks)
            ),
        )
        fell_back = job.transport == "auto" and any(t not in AGENT_TRANSPORTS for t in transports)
        row["fallback"] = fell_back
        if fell_back and job.fallback_is_failure:
            row["result"] = "failed"
            row["error"] = f"fell back to {row['transport']} ({row['why']})"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one VM's failure is its row, never the job's end
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        row["error"] = text
        ui.log(f"VM {vm.name} ({vm.uuid}) failed: {text}")
    row["ended"] = time.time()
    row["seconds"] = round(time.monotonic() - t0, 3)
    return row


def run_job(job, target, vms: list[SelectedVm], ui: Progress) -> list[dict[str, Any]]:
    """Back up ``vms`` under the job's limits; the rows in selection order."""
    from orchestrator.jobs.backup.routing import Router

    slots = HostSlots(vms, job.max_vms, job.max_per_host)
    router = Router()  # one for the job: shared-SR load and hosts without an agent, job-wide
    rows: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    interrupted: list[BaseException] = []

    def worker():
        while not interrupted:
            vm = slots.take()
            if vm is None:
                return
            try:
                row = backup_one(job, target, vm, ui, router)
            except BaseException as exc:  # KeyboardInterrupt: stop handing out VMs
                interrupted.append(exc)
                row = _row(vm)
                row["error"] = "interrupted"
            finally:
                slots.release(vm)
            with lock:
                rows[vm.uuid] = row

    threads = [
        threading.Thread(target=worker, name=f"job-{job.name}-{i}", daemon=True)
        for i in range(min(job.max_vms, max(1, len(vms))))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if interrupted:
        raise KeyboardInterrupt()
    return [rows[v.uuid] for v in vms if v.uuid in rows]


def apply_retention(job, vms: list[SelectedVm], ui: Progress) -> dict[str, Any]:
    """The job's retention on each of its VMs (no other VM of the repository is touched)."""
    policy = job.policy()
    if policy is None or not vms:
        return {"policy": None, "deleted": 0, "per_vm": {}}
    args = Namespace(repo=job.repository, passphrase_file=job.passphrase_file)
    out: dict[str, Any] = {"policy": policy.to_json(), "deleted": 0, "per_vm": {}}
    with open_repo(args, need_key=False) as repo:
        catalog = repo.scan()
        for vm in vms:
            res = run_prune(repo, policy, vm=vm.uuid, ui=ui, catalog=catalog)
            n = len(res.get("deleted", []))
            out["per_vm"][vm.uuid] = n
            out["deleted"] += n
    return out


def apply_copies(job, vms: list[SelectedVm], ui: Progress) -> list[dict[str, Any]]:
    """``copy-to``: this job's VMs copied to each second repository (fastpath copy: only the
    chunks it lacks, its own id and retention), after the backups and the retention. A copy that
    fails is a failed entry (the job then fails), never an exception."""
    from orchestrator.jobs.copy import CopyOptions, copy_repository

    out = []
    if not job.copy_to or not vms:
        return out
    src_args = Namespace(repo=job.repository, passphrase_file=job.passphrase_file)
    dst_args = Namespace(passphrase_file=job.copy_passphrase_file or job.passphrase_file)
    options = CopyOptions(vms=[v.uuid for v in vms], policy=job.policy())
    for url in job.copy_to:
        ui.log(f"job {job.name}: copy to {url}")
        try:
            shared = not job.copy_passphrase_file  # one passphrase file for both ends
            with (
                open_repo(src_args, shared_passphrase=shared) as src,
                open_repo(dst_args, url, shared_passphrase=shared) as dst,
            ):
                check_copy_ends(
                    src, dst, allow_plaintext=job.copy_allow_plaintext,
                    passphrase=shared and passphrase_given(src_args),
                )  # fmt: skip
                res = copy_repository(src, dst, options, ui)
            out.append({"to": url, "ok": bool(res.get("ok")), "error": None, "result": res})
        except Exception as exc:
            out.append({"to": url, "ok": False, "error": " ".join(str(exc).split())[:500]})
    return out


def newest_points(job, vms: list[SelectedVm]) -> dict[str, float]:
    """vm uuid -> timestamp of its newest complete restore point (for the textfile)."""
    args = Namespace(repo=job.repository, passphrase_file=job.passphrase_file)
    out = {}
    with open_repo(args, need_key=False) as repo:
        for vm in vms:
            points = [p for p in repo.list_restore_points(vm.uuid) if p.complete]
            if points:
                out[vm.uuid] = max(p.timestamp for p in points)
    return out
