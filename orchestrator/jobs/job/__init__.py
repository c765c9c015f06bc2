"""``fastpath job run|check|timer FILE``: backup jobs (many VMs of a pool, under concurrency
limits, then retention, then a report) described by a TOML job file. Here: the commands; the
file format is config.py, the VM selection selection.py, the runner runner.py, the report
sinks and systemd units sinks.py. See docs/jobs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from orchestrator.cliutil import CommandFailed, UsageError
from orchestrator.jobs import xapi_session
from orchestrator.jobs.job import sinks
from orchestrator.jobs.job.config import JobConfig, load_job
from orchestrator.jobs.job.selection import select_vms
from orchestrator.progress import Progress


def register(registry) -> None:
    p = registry.add("run", cmd_run, help="run a backup job file", group="job")
    p.add_argument("file", metavar="FILE", help="the job file (TOML)")
    _xapi_overrides(p)
    p.add_argument("--report-json", metavar="FILE", help="also write the report to FILE")
    p.set_defaults(_render=render_report, _render_failed=render_report)

    p = registry.add("check", cmd_check, help="validate a job file, list its VMs", group="job")
    p.add_argument("file", metavar="FILE")
    _xapi_overrides(p)
    p.set_defaults(_render=_render_check)

    p = registry.add("timer", cmd_timer, help="write a systemd timer for a job", group="job")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--on-calendar",
        required=True,
        metavar="SPEC",
        help="systemd calendar expression (daily, Mon..Fri 02:00, ...)",
    )
    p.add_argument(
        "--dir",
        default="/etc/systemd/system",
        help="where to write the units (default %(default)s)",
    )
    p.set_defaults(_render=lambda r: "\n".join(f"wrote {f}" for f in r["files"]))


def _xapi_overrides(p) -> None:
    xapi_session.add_xapi_arguments(p)  # --xapi, --user, --password-file, --password, ...


def job_target(job: JobConfig, args: argparse.Namespace) -> xapi_session.XapiTarget:
    """The pool connection: command-line flags over the job file over the environment."""
    password = args.password  # resolve_target warns about a password on argv
    pfile = args.password_file or (None if password is not None else job.password_file)
    ns = argparse.Namespace(
        xapi=args.xapi or job.xapi,
        user=args.user or job.user,
        password=password,
        password_file=pfile if password is None else None,
        xapi_cafile=args.xapi_cafile or job.xapi_cafile,
        hostsim=args.hostsim,
    )
    return xapi_session.resolve_target(ns)


def _connect(target):
    try:
        return xapi_session.connect(target)
    except ConnectionError as exc:
        raise CommandFailed(f"cannot reach the pool master: {exc}") from None


def _select(job, target):
    session = _connect(target)
    try:
        return select_vms(session.xenapi, job)
    finally:
        xapi_session.logout(session)


def cmd_check(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    job = load_job(args.file)
    target = job_target(job, args)
    vms, warnings = _select(job, target)
    for w in warnings:
        ui.log(f"warning: {w}")
    return {
        "ok": True,
        "job": job.name,
        "file": job.path,
        "repository": job.repository,
        "xapi": target.url,
        "max_vms": job.max_vms,
        "max_per_host": job.max_per_host,
        "warnings": warnings,
        "vms": [{"vm": v.uuid, "name": v.name, "host": v.host, "selected_by": v.why} for v in vms],
    }


def _tail_lines(r: dict[str, Any]) -> list[str]:
    """The copy-to results and warnings that end both the check and the run reports."""
    lines = []
    for c in r.get("copies", []):
        if c["ok"]:
            res = c["result"]
            lines.append(
                f"  copy to {c['to']}: {len(res.get('copied', []))} point(s) copied, "
                f"{res.get('chunks_sent', 0)} chunk(s) sent"
            )
        else:
            lines.append(f"  copy to {c['to']}: FAILED: {c.get('error') or c['result']}")
    return lines + [f"  warning: {w}" for w in r["warnings"]]


def _render_check(r: dict[str, Any]) -> str:
    lines = [f"job {r['job']}: {len(r['vms'])} VM(s) selected now"]
    lines += [f"  {v['vm']}  {v['name']}  ({v['selected_by']})" for v in r["vms"]]
    return "\n".join(lines + _tail_lines(r))


def cmd_run(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.jobs.job import runner  # the backup pipeline: not for --help

    job = load_job(args.file)
    target = job_target(job, args)
    started = time.time()
    vms, warnings = _select(job, target)
    for w in warnings:
        ui.log(f"warning: {w}")
    ui.log(f"job {job.name}: {len(vms)} VM(s), max {job.max_vms} at once, {job.max_per_host}/host")
    rows = runner.run_job(job, target, vms, ui)
    retention = runner.apply_retention(job, vms, ui)
    copies = runner.apply_copies(job, vms, ui)
    ended = time.time()
    failed = [r for r in rows if r["result"] != "ok"]
    copies_failed = [c for c in copies if not c["ok"]]
    report = {
        "ok": not failed and not copies_failed,
        "job": job.name,
        "file": job.path,
        "repository": job.repository,
        "started": round(started, 3),
        "ended": round(ended, 3),
        "warnings": warnings,
        "vms": rows,
        "retention": retention,
        "copies": copies,
        "totals": {
            "vms": len(rows),
            "ok": len(rows) - len(failed),
            "failed": len(failed),
            "bytes_read": sum(r["bytes_read"] for r in rows),
            "bytes_stored": sum(r["bytes_stored"] for r in rows),
            "seconds": round(ended - started, 3),
        },
    }
    _sinks(job, args, report, vms, ui)
    if failed:
        names = ", ".join(r["name"] for r in failed)
        raise CommandFailed(
            f"job {job.name}: {len(failed)} of {len(rows)} VM(s) failed: {names}", report
        )
    if copies_failed:
        where = ", ".join(c["to"] for c in copies_failed)
        raise CommandFailed(f"job {job.name}: backups ok, copy failed to {where}", report)
    return report


def _sinks(job, args, report, vms, ui) -> None:
    from orchestrator.jobs.job import runner

    if args.report_json:
        sinks.atomic_write(args.report_json, json.dumps(report, indent=2) + "\n")
    if job.textfile:
        try:
            newest = runner.newest_points(job, vms)
            sinks.atomic_write(job.textfile, sinks.textfile(report, newest))
        except Exception as exc:  # metrics never fail a job that backed up
            ui.log(f"warning: textfile {job.textfile} not written: {exc}")
            report["warnings"].append(f"textfile not written: {exc}")
    if job.webhook:
        ok, attempts, error = sinks.post_webhook(job.webhook, report, job.webhook_retries)
        report["webhook"] = {"ok": ok, "attempts": attempts, "error": error}
        if not ok:
            ui.log(f"warning: webhook {job.webhook} failed after {attempts} attempt(s): {error}")


def render_report(r: dict[str, Any]) -> str:
    lines = [f"job {r['job']}: {r['totals']['ok']} of {r['totals']['vms']} VM(s) ok"]
    head = f"  {'VM':<20} {'result':<7} {'kind':<12} {'read on':<10} {'transport':<12} "
    lines.append(head + f"{'read':>12} {'stored':>12} {'time':>7}  why")
    for v in r["vms"]:
        lines.append(
            f"  {v['name'][:20]:<20} {v['result']:<7} {v['kind'] or '-':<12} "
            f"{(v.get('read_on') or '-')[:10]:<10} "
            f"{v['transport'] or '-':<12} {v['bytes_read']:>12} {v['bytes_stored']:>12} "
            f"{v['seconds']:>6.1f}s  {v['error'] or v['why'] or ''}"
        )
    t = r["totals"]
    lines.append(
        f"  total: {t['bytes_read']} bytes read, {t['bytes_stored']} stored, {t['seconds']:.1f} s;"
        f" retention deleted {r['retention']['deleted']} restore point(s)"
    )
    return "\n".join(lines + _tail_lines(r))


def cmd_timer(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    job = load_job(args.file)
    spec = args.on_calendar.strip()
    if not spec or "\n" in spec:
        raise UsageError("--on-calendar needs one systemd calendar expression")
    units = sinks.timer_units(job, spec)
    os.makedirs(args.dir, exist_ok=True)
    files = []
    for name, text in units.items():
        path = os.path.join(args.dir, name)
        sinks.atomic_write(path, text)
        files.append(path)
    timer = os.path.basename(files[1])
    ui.log(f"enable with: systemctl daemon-reload && systemctl enable --now {timer}")
    return {"ok": True, "job": job.name, "on_calendar": spec, "files": files}
