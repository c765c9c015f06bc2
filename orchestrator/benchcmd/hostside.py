"""Question 1 of ``fastpath bench``, host side: a VDI's allocated data delivered by the exporting
host to a client that discards it, on the same disks in the same run.

The rows (``HOST_KINDS``): the agent's NBD (``nbdcopy`` to ``null:``, and the orchestrator's own
libnbd reader), the agent's HTTP blocks stream (orchestrator reader, N streams) and VHD stream
(``curl`` to /dev/null), XAPI's way (hostsim's ``export_raw_vdi``: chain decoded to raw then
re-encoded VHD, one stream), xapi-nbd's way (hostsim's endpoint: no block status, one request at
a time per connection), ``qemu-nbd -r -f vpc`` + ``nbdcopy`` (flat VHD only: qemu cannot open
differencing disks), and the physical limit ``cat`` of the disk's VHD files from the page cache
to /dev/null. Every reader starts on a warm page cache (the VHD files are read just before).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from orchestrator.benchcmd import report
from orchestrator.benchcmd.harness import Bench
from orchestrator.benchcmd.measure import PY, child_env, run_measured

HOST_KINDS = {
    "agent-nbd-nbdcopy": ("agent NBD (nbdcopy)", "fast path"),
    "agent-nbd": ("agent NBD (orchestrator reader)", "fast path"),
    "agent-http-blocks": ("agent HTTP blocks stream", "fast path"),
    "agent-http-vhd": ("agent HTTP VHD stream (curl, 1 stream)", "fast path"),
    "xapi-export": ("XAPI's way: export_raw_vdi (1 stream)", "xapi"),
    "xapi-nbd": ("xapi-nbd's way (1 request in flight per connection)", "xapi"),
    "qemu-nbd": ("qemu-nbd -r -f vpc + nbdcopy", "plain nbd"),
    "cat": ("physical limit: cat from page cache", "limit"),
}


def host_side_cmd(b: Bench, kind: str, disk: dict[str, Any]) -> tuple[list[str], list[int]]:
    conns = b.opts.connections
    info = b.info
    if kind in ("agent-nbd-nbdcopy", "agent-nbd", "agent-http-blocks", "agent-http-vhd"):
        ticket = b.ticket(disk["vdi"])
        nbd_host, nbd_port = info["agent"]["nbd"][:2]
        http_host, http_port = info["agent"]["http"][:2]
        nbd_url = f"nbd://{nbd_host}:{nbd_port}/{ticket}"
        http_url = f"http://{http_host}:{http_port}/v1/exports/{ticket}"
        if kind == "agent-nbd-nbdcopy":
            return ["nbdcopy", f"--connections={conns}", nbd_url, "null:"], [b.agent_pid]
        if kind == "agent-http-vhd":
            return ["curl", "-sSf", "-o", "/dev/null", http_url + "/vhd"], [b.agent_pid]
        spec = {"kind": "agent-nbd" if kind == "agent-nbd" else "agent-http", "connections": conns}
        spec["url"] = nbd_url if kind == "agent-nbd" else http_url
        return [PY, "-m", "orchestrator.benchcmd.drain", json.dumps(spec)], [b.agent_pid]
    if kind in ("xapi-export", "xapi-nbd"):
        spec = {
            "kind": kind,
            "xapi": info["xapi"]["url"],
            "user": info["xapi"]["user"],
            "vdi": disk["vdi"],
            "connections": conns,
        }
        return [PY, "-m", "orchestrator.benchcmd.drain", json.dumps(spec)], [b.hostsim_pid]
    if kind == "qemu-nbd":
        proc, uri = b.start_qemu_nbd(disk["name"], disk["files"][0])
        return ["nbdcopy", f"--connections={conns}", uri, "null:"], [proc.pid]
    if kind == "cat":
        return ["cat", *disk["files"]], []
    raise ValueError(kind)


def host_side(b: Bench, disks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    samples: dict[tuple[str, str], list] = {}
    for run in range(b.opts.runs):
        for name, disk in disks.items():
            for f in disk["files"]:  # page cache warm for every reader alike
                subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
            for kind in HOST_KINDS:
                if kind == "qemu-nbd" and disk["depth"] != 1:
                    continue  # qemu's vpc driver cannot open differencing disks
                cmd, servers = host_side_cmd(b, kind, disk)
                b.opts.say(f"host side run {run + 1}/{b.opts.runs}: {name} {kind}")
                env = child_env({**b.env, "FASTPATH_XAPI_PASSWORD": b.info["xapi"]["password"]})
                sample, _ = run_measured(cmd, servers, env=env)
                samples.setdefault((name, kind), []).append(sample)
    rows = []
    for (name, kind), ss in samples.items():
        label, group = HOST_KINDS[kind]
        rows.append(
            report.make_row(
                f"host/{name}/{kind}",
                "host_side",
                label,
                name,
                disks[name]["allocated_bytes"],
                ss,
                kind=group,
                transport=kind,
                baseline_xapi=f"host/{name}/xapi-export",
                baseline_limit=f"host/{name}/cat",
            )
        )
    report.set_ratios(rows)
    return rows
