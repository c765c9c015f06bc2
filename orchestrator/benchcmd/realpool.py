"""``fastpath bench --xapi URL --vm UUID``: the same two questions against a real pool.

Read-only apart from its own snapshots: one snapshot of the VM is read by every host-side client
(the agent through its plugin, XAPI's ``export_raw_vdi``, xapi-nbd); end to end, per transport, a
full backup and an immediate incremental (``inc0``) into a fresh local repository, against a
local copy + fdatasync of the same number of bytes. See ``run_real_pool``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

from orchestrator.benchcmd import report
from orchestrator.benchcmd.endtoend import TRANSPORT_KIND, limit_cmd
from orchestrator.benchcmd.harness import Bench, Options
from orchestrator.benchcmd.hostside import HOST_KINDS
from orchestrator.benchcmd.measure import PY, child_env, run_measured
from orchestrator.benchcmd.output import finish


def run_real_pool(opts: Options) -> dict[str, Any]:
    """Against a real pool (``--xapi URL --vm UUID``): read-only apart from its own snapshots.

    One snapshot of the VM (``[fastpath-bench] …``) is read by every host-side client (the
    agent through its plugin, XAPI's export_raw_vdi, xapi-nbd); then, per transport, a full
    backup and an immediate incremental (``inc0``: nothing changed, the fixed cost) into a fresh
    repository. The physical limit is local: a file of the disk's allocated size (random bytes)
    copied with fdatasync onto the repository's filesystem. Guest writes are not possible here,
    so there are no 1 % / 10 % rows and no cat / qemu-nbd rows (the VHD files are in dom0).
    Every snapshot this run made is destroyed at the end, whatever happens.
    """
    import XenAPI

    from orchestrator.jobs.backup import SNAPSHOT_PREFIX, destroy_snapshot

    password = opts.password or os.environ.get("FASTPATH_XAPI_PASSWORD")
    if password is None:
        raise RuntimeError("--xapi needs --password (or $FASTPATH_XAPI_PASSWORD)")
    os.makedirs(opts.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fastpath-bench-")
    from orchestrator.jobs.xapi_session import XapiTarget, connect

    try:
        session = connect(XapiTarget(opts.xapi, opts.user, password, opts.xapi_cafile))
    except ConnectionError as exc:
        raise RuntimeError(str(exc)) from None
    x = session.xenapi
    t0 = time.time()
    vm = x.VM.get_by_uuid(opts.vm)
    before = set(x.VM.get_snapshots(vm))
    host = x.host.get_all()[0]
    b = Bench(opts, work)
    try:
        snap = x.VM.snapshot(vm, "[fastpath-bench] " + time.strftime("%Y%m%dT%H%M%SZ"))
        disks: dict[str, dict[str, Any]] = {}
        for vbd in x.VM.get_VBDs(snap):
            rec = x.VBD.get_record(vbd)
            if rec["type"] != "Disk" or rec["VDI"] == "OpaqueRef:NULL":
                continue
            vdi = x.VDI.get_record(rec["VDI"])
            name = f"disk{rec['userdevice']}"
            disks[name] = {
                "name": name,
                "vdi": vdi["uuid"],
                "size": int(vdi["virtual_size"]),
                "allocated_bytes": int(vdi["virtual_size"]),  # until XAPI's export tells
                "depth": None,
            }
        if not disks:
            raise RuntimeError(f"VM {opts.vm} has no disks")
        common = {"xapi": opts.xapi, "user": opts.user, "cafile": opts.xapi_cafile}
        env = child_env({"FASTPATH_XAPI_PASSWORD": password})
        samples: dict[tuple[str, str], list] = {}
        kinds = {
            "agent-nbd": ("agent NBD (orchestrator reader, via the plugin)", "fast path"),
            "agent-http-blocks": ("agent HTTP blocks stream (via the plugin)", "fast path"),
            "xapi-export": HOST_KINDS["xapi-export"],
            "xapi-nbd": HOST_KINDS["xapi-nbd"],
        }
        for run in range(opts.runs):
            for name, disk in disks.items():
                for kind in kinds:
                    opts.say(f"host side run {run + 1}/{opts.runs}: {name} {kind}")
                    ticket = None
                    if kind.startswith("agent"):
                        transport = "nbd" if kind == "agent-nbd" else "http"
                        args = {"vdi": disk["vdi"], "transports": transport, "ttl": "3600"}
                        try:
                            text = x.host.call_plugin(host, "fastpath", "open_export", args)
                        except XenAPI.Failure as exc:
                            opts.say(f"  agent plugin unavailable ({exc.details}): row skipped")
                            continue
                        export = json.loads(text)
                        ticket = export.get("ticket")
                        spec = {"kind": f"{kind.split('-blocks')[0]}-plugin", "export": export}
                    else:
                        spec = {"kind": kind, "vdi": disk["vdi"], **common}
                    spec["connections"] = opts.connections
                    cmd = [PY, "-m", "orchestrator.benchcmd.drain", json.dumps(spec)]
                    try:
                        sample, out = run_measured(cmd, [], env=env)
                        sample["bytes_read"] = json.loads(out.strip().splitlines()[-1])["bytes"]
                    finally:
                        if ticket:
                            x.host.call_plugin(host, "fastpath", "close_export", {"ticket": ticket})
                    samples.setdefault((name, kind), []).append(sample)
        for name, disk in disks.items():  # what XAPI's export carried: the allocated blocks
            got = [s["bytes_read"] for s in samples.get((name, "xapi-export"), [])]
            if got:
                disk["allocated_bytes"] = max(got)
        host_rows = [
            report.make_row(
                f"host/{name}/{kind}",
                "host_side",
                kinds[kind][0],
                name,
                disks[name]["allocated_bytes"],
                ss,
                kind=kinds[kind][1],
                transport=kind,
                baseline_xapi=f"host/{name}/xapi-export",
            )
            for (name, kind), ss in samples.items()
        ]
        report.set_ratios(host_rows)
        destroy_snapshot(x, snap)
        e2e_rows = real_pool_end_to_end(b, opts, disks, password)
    finally:
        for ref in set(x.VM.get_snapshots(vm)) - before:
            label = x.VM.get_name_label(ref)
            if label.startswith(("[fastpath-bench] ", SNAPSHOT_PREFIX)):
                destroy_snapshot(x, ref)
        try:
            x.session.logout()
        except Exception:
            pass
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "ok": True,
        "target": opts.xapi,
        "data": f"VM {opts.vm} of a real pool (its own data); "
        + "; ".join(f"{n}: {d['size'] >> 20} MiB virtual" for n, d in disks.items()),
        "disks": {
            n: {"size": d["size"], "allocated_bytes": d["allocated_bytes"]}
            for n, d in disks.items()
        },
        "params": {
            "runs": opts.runs,
            "connections": opts.connections,
            "quick": opts.quick,
            "transports": list(opts.transports),
            "steps": ["full", "inc0"],
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "seconds": time.time() - t0,
        "questions": {
            "host_side": {
                "title": "1. Host side: export read by a discarding client (server CPU not "
                "visible from here)",
                "baseline": "xapi-export",
                "limit": None,
                "rows": host_rows,
            },
            "end_to_end": {
                "title": "2. End to end: backup into a repository vs the physical limit",
                "baseline": "xapi-export (same step)",
                "limit": "copy + fdatasync of the same number of bytes",
                "rows": e2e_rows,
            },
        },
    }
    return finish(result, opts)


def real_pool_end_to_end(b: Bench, opts: Options, disks: dict, password: str) -> list[dict]:
    # plain local repositories, pinned in the bench's own state dir: no passphrase
    env = child_env(
        {"FASTPATH_XAPI_PASSWORD": password, "FASTPATH_STATE_DIR": os.path.join(b.work, "state")}
    )
    total = sum(d["allocated_bytes"] for d in disks.values())
    blob = os.path.join(b.work, "limit-source.bin")
    with open(blob, "wb") as f:
        left = total
        while left > 0:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    samples: dict[tuple[str, str], list] = {}
    for run in range(opts.runs):
        opts.say(f"end to end run {run + 1}/{opts.runs}: physical limit")
        sample, _ = run_measured(limit_cmd(b, {"name": "vm", "files": [blob]}, "local"), [], env)
        samples.setdefault(("limit", ""), []).append(sample)
        for transport in opts.transports:
            repo = b.new_repo("local")
            try:
                for step in ("full", "inc0"):
                    opts.say(f"end to end run {run + 1}/{opts.runs}: {transport} {step}")
                    cmd = [PY, "-m", "orchestrator.cli", "backup", "vm", opts.vm]
                    cmd += ["--xapi", opts.xapi, "--user", opts.user, "--repo", repo]
                    cmd += ["--transport", transport, "--connections", str(opts.connections)]
                    cmd += ["--json", "--progress", "quiet"]
                    if opts.xapi_cafile:
                        cmd += ["--xapi-cafile", opts.xapi_cafile]
                    if transport == "xapi-nbd":
                        cmd.append("--cbt")
                    sample, _ = run_measured(cmd, [], env)
                    samples.setdefault((transport, step), []).append(sample)
            finally:
                b.drop_repo(repo)
    rows = []
    for (transport, step), ss in samples.items():
        if transport == "limit":
            rows.append(
                report.make_row(
                    "e2e/vm/limit/local",
                    "end_to_end",
                    "physical limit: copy + fdatasync",
                    "vm",
                    total,
                    ss,
                    kind="limit",
                    transport="limit",
                    repo="local",
                    step="",
                )
            )
            continue
        rows.append(
            report.make_row(
                f"e2e/vm/{transport}/local/{step}",
                "end_to_end",
                f"backup --transport {transport}",
                "vm",
                total,
                ss,
                kind=TRANSPORT_KIND[transport],
                transport=transport,
                repo="local",
                step=step,
                baseline_xapi=f"e2e/vm/xapi-export/local/{step}",
                baseline_limit="e2e/vm/limit/local",
            )
        )
    report.set_ratios(rows)
    return rows
