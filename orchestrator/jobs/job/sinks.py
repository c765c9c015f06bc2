"""Where a job's report goes besides stdout: ``--report-json FILE``, a webhook (JSON POST,
retried, never fails the job), a Prometheus textfile (node_exporter's textfile collector:
``*.prom`` written to a temporary file in the same directory and renamed, so the collector never
reads half a file); and the systemd service + timer pair of ``fastpath job timer``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from typing import Any

from orchestrator.atomicfile import write_atomically


def atomic_write(path: str, text: str) -> None:
    write_atomically(path, text.encode())


def post_webhook(url: str, report: dict[str, Any], retries: int = 3, timeout: float = 10.0):
    """POST ``report`` as JSON; returns (ok, attempts, error). Never raises."""
    import urllib.error
    import urllib.request  # here: http.client and email cost ~30 ms to every command

    body = json.dumps(report).encode()
    error = None
    attempts = 0
    for attempt in range(max(1, retries)):
        attempts = attempt + 1
        req = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
            return True, attempts, None
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            error = str(getattr(exc, "reason", exc))
        if attempt + 1 < retries:
            time.sleep(min(8.0, 0.5 * 2**attempt))
    return False, attempts, error


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def textfile(report: dict[str, Any], newest: dict[str, float], now: float | None = None) -> str:
    """The report as Prometheus text exposition format (one job's metrics)."""
    now = time.time() if now is None else now
    job = _label(report["job"])
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}")

    base = {"job": job}
    metric(
        "fastpath_job_last_run_start_timestamp_seconds",
        "gauge",
        "Start of the job's last run.",
        [(base, report["started"])],
    )
    metric(
        "fastpath_job_last_run_end_timestamp_seconds",
        "gauge",
        "End of the job's last run.",
        [(base, report["ended"])],
    )
    metric(
        "fastpath_job_last_run_success",
        "gauge",
        "1 when every VM of the last run succeeded.",
        [(base, int(report["ok"]))],
    )
    rows = report["vms"]

    def per_vm(key, conv=float):
        return [({"job": job, "vm": r["vm"], "name": r["name"]}, conv(r[key])) for r in rows]

    metric(
        "fastpath_vm_backup_success",
        "gauge",
        "1 when the VM's last backup succeeded.",
        [({"job": job, "vm": r["vm"], "name": r["name"]}, int(r["result"] == "ok")) for r in rows],
    )
    metric(
        "fastpath_vm_backup_bytes_read",
        "gauge",
        "Bytes read by the VM's last backup.",
        per_vm("bytes_read", int),
    )
    metric(
        "fastpath_vm_backup_bytes_stored",
        "gauge",
        "Bytes stored (new) by the VM's last backup.",
        per_vm("bytes_stored", int),
    )
    metric(
        "fastpath_vm_backup_duration_seconds",
        "gauge",
        "Duration of the VM's last backup.",
        per_vm("seconds"),
    )
    metric(
        "fastpath_vm_newest_restore_point_age_seconds",
        "gauge",
        "Age of the VM's newest restore point.",
        [
            ({"job": job, "vm": r["vm"], "name": r["name"]}, round(now - newest[r["vm"]], 3))
            for r in rows
            if r["vm"] in newest
        ],
    )
    return "\n".join(lines) + "\n"


def _unit_name(job_name: str) -> str:
    return f"fastpath-job-{job_name}"


def timer_units(job, on_calendar: str, exe: list[str] | None = None) -> dict[str, str]:
    """{"<unit>.service": text, "<unit>.timer": text} running ``fastpath job run FILE``."""
    exe = exe or [sys.executable, "-m", "orchestrator.cli"]
    cmd = " ".join(shlex.quote(a) for a in [*exe, "job", "run", job.path])
    name = _unit_name(job.name)
    service = (
        "[Unit]\n"
        f"Description=xcp-fastpath backup job {job.name}\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={cmd}\n"
        "Nice=10\n"
        "IOSchedulingClass=best-effort\n"
    )
    timer = (
        "[Unit]\n"
        f"Description=Schedule of xcp-fastpath backup job {job.name}\n\n"
        "[Timer]\n"
        f"OnCalendar={on_calendar}\n"
        "Persistent=true\n"
        f"Unit={name}.service\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    return {f"{name}.service": service, f"{name}.timer": timer}
