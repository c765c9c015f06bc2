"""Backup speed, both questions of docs/benchmarks.md "How speed is compared", in one
run.

Data: a disk of --size bytes (default 4 GiB) holding an ext4 file system made with
``mkfs.ext4 -d`` from hard links to real files of /usr (text, binaries, libraries) up to about
half the disk, so about half of the 2 MiB blocks are allocated; written as a dynamic VHD by our
writer (only non-zero blocks allocated) and installed as the disk of a VM of a hostsim pool
(in-process XAPI, file SR, xapi-nbd, and the real fastpath agent with TLS as in dom0).

1. Host side: the snapshot's disk read by a client that discards the bytes:
     agent NBD   (orchestrator.sources.agent_nbd: libnbd, 4 connections, aio)
     agent NBD   (nbdcopy -> null:, an NBD client we did not write)
     agent HTTP  (/blocks, 4 parallel streams)      agent HTTP (/vhd, one stream)
     XAPI's way  (hostsim's export_raw_vdi?format=vhd in its "processes" model: a tapdisk
                 process decoding the chain with O_DIRECT behind blktap's request limits, a
                 vhd-tool process encoding the VHD stream, the TLS hop; see docs/benchmarks.md
                 "hostsim's model of XAPI's export"), and the same in hostsim's older "inline"
                 model (one function in the XAPI process) for comparison
     xapi-nbd    (hostsim's XAPI NBD: nbdcopy, 1 connection; and our xapi-nbd source, 4 conns)
   Each twice: warm (the SR's VHD files read just before) and cold (their pages evicted with
   posix_fadvise DONTNEED first, as on a host whose dom0 has not just read the VDI).
   Reported: seconds for the whole disk, payload GB/s, and the speed-up over XAPI's way
   (goal >= 5x for the agent).
2. End to end, into a local repository on the same file system as --work:
     copy+fdatasync of the VHD file (the physical limit of this run)
     full backup (agent NBD), then 1 % and 10 % incremental backups (that share of the disk's
     blocks rewritten by the guest between backups)
   Reported: seconds, GB/s of allocated data, peak RSS of each backup process, ratios
   (goals: full >= 0.8x copy+fdatasync; 1 % incremental <= 3 % of the full backup's time).

    .venv/bin/python -m bench.backup                  # 4 GiB disk
    .venv/bin/python -m bench.backup --quick          # 256 MiB disk: a smoke run
    .venv/bin/python -m bench.backup --size 8G --work /var/tmp/fpbench --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlencode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the disk (ext4 of /usr files) is the package's, shared with `fastpath bench --data usr`
from orchestrator.benchcmd.usrdisk import build_disk, install_in_pool  # noqa: E402

BS = 2 << 20
GB = 1e9

MEASURE = r"""
import time
t0 = time.time()
import contextlib, io, json, resource, sys
sys.path.insert(0, {root!r})
from orchestrator.cli import main
t1 = time.time()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
print(json.dumps({{"code": code, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "result": out.getvalue(), "t0": t0, "t1": t1, "t2": time.time()}}), flush=True)
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().rstrip("B").rstrip("I")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- host side -----------------------------------------------------------------------------------


def timed(fn):
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def drain_source(src) -> int:
    src.open()
    n = 0
    for _i, data in src.read_blocks():
        n += len(data)
    src.close()
    return n


def drain_http(url: str, path: str, fingerprint=None, cafile=None) -> int:
    from orchestrator.sources import httpclient

    conn, resp = httpclient.get(url, path, fingerprint=fingerprint, cafile=cafile, timeout=600)
    n = 0
    try:
        while True:
            data = resp.read(1 << 20)
            if not data:
                break
            n += len(data)
    finally:
        conn.close()
    return n


def nbdcopy_null(uri: str, connections: int | None = None) -> int:
    cmd = ["nbdcopy", uri, "null:"]
    if connections:
        cmd[1:1] = [f"--connections={connections}"]
    subprocess.run(cmd, check=True, timeout=3600)
    return 0


def host_side(ctx, repeat: int = 1, only: list[str] | None = None) -> list[dict]:
    from orchestrator.sources.agent_http import AgentHttpSource
    from orchestrator.sources.agent_nbd import AgentNbdSource
    from orchestrator.sources.xapi_nbd import XapiNbdSource

    x, host, snap_uuid, snap_ref = ctx["x"], ctx["host"], ctx["snap_uuid"], ctx["snap_ref"]

    def export(transports="nbd,http"):
        args = {"vdi": snap_uuid, "transports": transports}
        return json.loads(x.host.call_plugin(host, "fastpath", "open_export", args))

    tls_dir = tempfile.mkdtemp(prefix="bench-tls-")
    shutil.copy(ctx["cafile"], os.path.join(tls_dir, "ca-cert.pem"))
    session_ref = ctx["session"]._session
    xapi_url = ctx["url"].rstrip("/")

    # Each method: prepare() (open the export: a plugin call, not timed) -> run() (timed).
    def agent_nbd():
        e = export()
        return lambda: drain_source(AgentNbdSource.from_plugin(e, connections=4, depth=8))

    def agent_nbdcopy():
        nbd = export()["nbd"]
        uri = f"nbds://{nbd['host']}:{nbd['port']}/{nbd['export_name']}?tls-certificates={tls_dir}"
        return lambda: nbdcopy_null(uri)

    def agent_blocks():
        e = export()
        return lambda: drain_source(AgentHttpSource.from_plugin(e, streams=4))

    def agent_vhd():
        e = export()
        url = e["http"]["url"]
        path = "/" + url.split("/", 3)[3] + "/vhd"
        return lambda: drain_http(url, path, fingerprint=e["fingerprint"])

    def xapi_export(model="processes"):
        from hostsim import datapath

        def prepare():
            datapath.set_export_model(ctx["pool"], model)
            q = urlencode({"session_id": session_ref, "vdi": snap_uuid, "format": "vhd"})
            return lambda: drain_http(xapi_url, f"/export_raw_vdi?{q}", cafile=ctx["cafile"])

        return prepare

    def xapi_nbd_nbdcopy():
        info = x.VDI.get_nbd_info(snap_ref)[0]
        uri = (
            f"nbds://{info['address']}:{info['port']}{info['exportname'].replace('?', '%3F')}"
            f"?tls-certificates={tls_dir}"
        )
        return lambda: nbdcopy_null(uri, connections=1)

    def xapi_nbd_source():
        return lambda: drain_source(XapiNbdSource(x, snap_ref, connections=4))

    methods = [
        ("XAPI export_raw_vdi (vhd)", xapi_export("processes"), "xapi"),
        ("  same, hostsim inline model", xapi_export("inline"), "xapi-inline"),
        ("xapi-nbd, nbdcopy 1 conn", xapi_nbd_nbdcopy, "xapi-nbd"),
        ("xapi-nbd, our source 4 conns", xapi_nbd_source, "xapi-nbd"),
        ("agent NBD, our source 4x8", agent_nbd, "agent"),
        ("agent NBD, nbdcopy", agent_nbdcopy, "agent"),
        ("agent HTTP /blocks 4 streams", agent_blocks, "agent"),
        ("agent HTTP /vhd 1 stream", agent_vhd, "agent"),
    ]
    if only:
        # the XAPI row stays: every ratio is against it
        methods = [m for m in methods if m[2] == "xapi" or any(o in m[0] for o in only)]
    rows = [{"method": name, "kind": kind} for name, _fn, kind in methods]
    # Rounds: every method once per round, so load from elsewhere on the machine spreads over
    # all methods alike; each cell is the median of its rounds (samples kept in the JSON).
    for rnd in range(repeat):
        for (name, fn, _kind), row in zip(methods, rows, strict=True):
            for cache in ("warm", "cold"):
                try:
                    run = fn()
                    if cache == "cold":
                        evict(ctx["sr_files"])
                    else:
                        warm(ctx["sr_files"])
                    cpu0 = proc_cpu(ctx.get("agent_pid"))
                    seconds, n = timed(run)
                    row.setdefault(cache + "_samples", []).append(seconds)
                    row[cache] = statistics.median(row[cache + "_samples"])
                    row["bytes"] = n
                    cpu = ""
                    if _kind == "agent" and cpu0 is not None:
                        # the agent's own CPU seconds for this read: steadier than wall time
                        # on a loaded machine
                        spent = proc_cpu(ctx["agent_pid"]) - cpu0
                        row.setdefault(cache + "_agent_cpu_samples", []).append(spent)
                        row[cache + "_agent_cpu"] = statistics.median(
                            row[cache + "_agent_cpu_samples"]
                        )
                        cpu = f", agent CPU {spent:.2f} s"
                    log(f"  {name} ({cache}, round {rnd + 1}): {seconds:.2f} s{cpu}")
                except Exception as exc:  # a method that does not work here is reported
                    row.setdefault("error", str(exc)[:200])
                    log(f"  {name} ({cache}): FAILED {exc}")
    shutil.rmtree(tls_dir, ignore_errors=True)
    return rows


def proc_cpu(pid) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sr_files(pool) -> list[str]:
    root = pool.sr.path
    return [os.path.join(root, n) for n in os.listdir(root) if n.endswith(".vhd")]


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def evict(paths) -> None:
    """Drop these files' pages from the page cache (clean pages: no root needed), so a method
    reads from the disk as on a host whose dom0 has not just read the VDI."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- end to end --------------------------------------------------------------------------------


def cli_backup(ctx, repo: str, extra=()) -> dict:
    args = [
        "backup", "vm", ctx["vm_uuid"], "--xapi", ctx["url"], "--user", "root",
        "--password", "hostsim", "--xapi-cafile", ctx["cafile"], "--repo", repo,
        "--transport", "nbd", "--json", *extra,
    ]  # fmt: skip
    spawned = time.time()
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE.format(root=ROOT), *args],
        capture_output=True,
        text=True,
        timeout=7200,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - t
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"backup failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    result = json.loads(out["result"])
    # Where the whole command's time went: interpreter start, imports, the job's own steps
    # (``phases`` of ``backup vm --json``), the process's exit.
    phases = {
        "python_start": out["t0"] - spawned,
        "imports": out["t1"] - out["t0"],
        **result.get("phases", {}),
        "exit": ended - out["t2"],
    }
    return {
        "phases": phases,
        "seconds": seconds,
        "data_seconds": max(d["seconds"] for d in result["disks"]),
        "bytes_read": result["bytes_read"],
        "bytes_written": result["bytes_written"],
        "peak_rss": out["maxrss_kib"] * 1024,
        "incremental": result["disks"][0]["incremental"],
    }


def rewrite_share(pool, vdi_ref, size: int, share: float, seed: int) -> int:
    """Rewrite ``share`` of the disk's blocks (256 KiB of new text-like data in each)."""
    from hostsim import guest

    rng = random.Random(seed)
    count = max(1, int(size // BS * share))
    blocks = rng.sample(range(size // BS), count)
    for b in blocks:
        pool.guest_write(
            vdi_ref, b * BS + 4096 * rng.randrange(0, 448), guest.text_bytes(rng, 256 << 10)
        )
    return count


def copy_fdatasync(src: str, dst: str) -> float:
    t = time.perf_counter()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            data = fi.read(8 << 20)
            if not data:
                break
            fo.write(data)
        fo.flush()
        os.fdatasync(fo.fileno())
    return time.perf_counter() - t


# -- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="4G")
    p.add_argument("--quick", action="store_true", help="256 MiB disk (smoke run)")
    p.add_argument("--work", help="work directory (default: a temporary one under /var/tmp)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument(
        "--skip-host-side", action="store_true", help="only question 2 (end to end backups)"
    )
    p.add_argument("--skip-end-to-end", action="store_true", help="only question 1 (host side)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="host side: rounds of every method; each cell is the median (default 1)",
    )
    p.add_argument(
        "--methods",
        help="host side: only the methods whose name contains one of these comma-separated "
        "words (XAPI's way is always measured: the ratios need it)",
    )
    p.add_argument(
        "--connections", type=int, help="backup --connections (default: the command's default)"
    )
    p.add_argument(
        "--keep-xapi-stall",
        action="store_true",
        help="put back the ~40 ms per-call Nagle stall of a naive XML-RPC server (see below)",
    )
    args = p.parse_args(argv)
    size = parse_size("256M" if args.quick else args.size)
    size -= size % BS
    work = args.work or tempfile.mkdtemp(prefix="fastpath-bench-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    from argparse import Namespace

    from hostsim.cli import configure_plugin, start_agent
    from hostsim.host import Pool

    if args.keep_xapi_stall:
        # hostsim's XML-RPC handler sends headers and body in two writes; with Nagle on, every
        # call waits for the client's delayed ACK (~40 ms, ~2 s per backup command), a stall a
        # real XAPI does not have. hostsim turns Nagle off; this puts the stall back to measure it.
        import hostsim.server

        hostsim.server.Handler.disable_nagle_algorithm = False

    agent_proc = None
    pool = None
    try:
        raw, _staged = build_disk(work, size)
        pool = Pool(os.path.join(work, "hostsim"))
        flat = os.path.join(work, "disk.vhd")
        vm, vdi_ref, vdi_uuid, vhd_path, allocated = install_in_pool(pool, raw, size, flat)
        os.unlink(raw)
        url = pool.start(nbd_listen=("127.0.0.1", 0), tls=True)  # XAPI is HTTPS in production
        agent_proc, agent_info = start_agent(
            pool,
            pool.root,
            Namespace(
                agent_nbd_listen="127.0.0.1:0", agent_http_listen="127.0.0.1:0", agent_tls="require"
            ),
        )
        configure_plugin(pool, pool.root, agent_info)
        from orchestrator.jobs import xapi_session

        target = xapi_session.XapiTarget(url, "root", "hostsim", pool.cert_path)
        session = xapi_session.connect(target)
        x = session.xenapi
        vm_uuid = x.VM.get_uuid(vm)
        snap = x.VM.snapshot(vm, "bench snapshot")
        snap_vdi = [x.VBD.get_VDI(v) for v in x.VM.get_VBDs(snap)][0]
        ctx = {
            "x": x,
            "session": session,
            "url": url,
            "host": x.host.get_all()[0],
            "snap_ref": snap_vdi,
            "snap_uuid": x.VDI.get_uuid(snap_vdi),
            "cafile": pool.cert_path,
            "vm_uuid": vm_uuid,
            "pool": pool,
            "sr_files": sr_files(pool),
            "agent_pid": agent_proc.pid,
        }
        log(f"disk: {size / GB:.2f} GB virtual, {allocated / GB:.2f} GB allocated")
        warm([vhd_path])
        host = []
        if not args.skip_host_side:
            log("host side (warm cache, discarding clients):")
            only = [m.strip() for m in args.methods.split(",")] if args.methods else None
            host = host_side(ctx, max(1, args.repeat), only)
        x.VM.destroy(snap)
        x.VDI.destroy(snap_vdi)

        full, incs, base_copy, vhd_bytes = None, {}, None, None
        if not args.skip_end_to_end:
            log("end to end:")
            repo = os.path.join(work, "repo")
            from orchestrator.repo.repository import Repository

            Repository.init(repo).close()
            warm([flat])  # like the SR's files
            base_copy = copy_fdatasync(flat, os.path.join(work, "copy.vhd"))
            os.unlink(os.path.join(work, "copy.vhd"))
            vhd_bytes = os.path.getsize(flat)
            log(f"  copy+fdatasync of the VHD ({vhd_bytes / GB:.2f} GB): {base_copy:.2f} s")
            extra = ["--connections", str(args.connections)] if args.connections else []
            full = cli_backup(ctx, repo, extra)
            log(f"  full backup: {full['seconds']:.2f} s")
            incs = {}
            for share, seed in ((0.01, 1), (0.10, 2)):
                n = rewrite_share(pool, vdi_ref, size, share, seed)
                incs[share] = cli_backup(ctx, repo, extra)
                incs[share]["blocks_rewritten"] = n
                log(f"  {share:.0%} incremental: {incs[share]['seconds']:.2f} s")
        session.xenapi.session.logout()
    finally:
        if agent_proc is not None:
            agent_proc.terminate()
            agent_proc.wait(30)
        if pool is not None:
            pool.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    # -- report --
    print(
        f"\nbench/backup.py: {size / GB:.2f} GB disk, {allocated / GB:.2f} GB allocated "
        "(ext4 of /usr files), warm page cache, 2 cores shared; hostsim XAPI "
        + ("with its ~40 ms per-call stall" if args.keep_xapi_stall else "without Nagle stall")
    )
    goal_host = {}
    if host:
        print("\n1. host side: the whole disk to a discarding client")
        print(
            "   warm = the SR's VHD files in the page cache; cold = evicted first "
            "(XAPI's tapdisk reads with O_DIRECT either way)"
        )
        xapi = next((r for r in host if r["kind"] == "xapi" and "warm" in r), None)
        head = "".join(f" {c + ' s':>8} {'GB/s':>6} {'vs XAPI':>8}" for c in ("warm", "cold"))
        print(f"  {'method':32}{head}")
        for r in host:
            cells = ""
            for c in ("warm", "cold"):
                if c not in r:
                    cells += f" {'failed':>8} {'':>6} {'':>8}"
                    continue
                gbs = f"{r['bytes'] / r[c] / GB:.2f}" if r["bytes"] else "-"
                ratio = f"{xapi[c] / r[c]:.1f}x" if xapi and c in xapi else "-"
                cells += f" {r[c]:8.2f} {gbs:>6} {ratio:>8}"
            cpu = r.get("warm_agent_cpu")
            if cpu is not None:
                cells += f"   agent CPU {cpu:.2f} s warm, {r.get('cold_agent_cpu', 0):.2f} s cold"
            print(f"  {r['method']:32}{cells}")
            if "error" in r:
                print(f"    ({r['error']})")
        for c in ("warm", "cold"):
            best = min((r[c] for r in host if r["kind"] == "agent" and c in r), default=None)
            if xapi and c in xapi and best:
                goal_host[c] = xapi[c] / best
    if full is None:
        print("\nratios:")
        for c, v in goal_host.items():
            print(f"  host side ({c}), best agent method vs XAPI's way: {v:.1f}x (goal >= 5x)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"size": size, "allocated": allocated, "host_side": host}, f, indent=1)
        return 0
    print("\n2. end to end (local repository, same file system)")
    print(f"  {'what':32} {'seconds':>8} {'data phase s':>12} {'GB/s':>6} {'peak RSS MiB':>13}")
    print(
        f"  {'copy+fdatasync of the VHD':32} {base_copy:8.2f} {base_copy:12.2f} "
        f"{vhd_bytes / base_copy / GB:6.2f} {'-':>13}"
    )
    rows = [("full backup", full)] + [
        (f"{int(s * 100)} % incremental", incs[s]) for s in sorted(incs)
    ]
    for name, r in rows:
        gbs = r["bytes_read"] / max(r["data_seconds"], 1e-9) / GB
        print(
            f"  {name:32} {r['seconds']:8.2f} {r['data_seconds']:12.2f} {gbs:6.2f} "
            f"{r['peak_rss'] / (1 << 20):13.0f}"
        )
    ratio_full = base_copy / full["seconds"]
    ratio_inc = incs[0.01]["seconds"] / full["seconds"]
    print("\nratios:")
    for c, v in goal_host.items():
        print(f"  host side ({c}), best agent method vs XAPI's way: {v:.1f}x (goal >= 5x)")
    print(
        f"  full backup vs copy+fdatasync: {ratio_full:.2f}x (goal >= 0.8x); data phase only "
        f"{base_copy / full['data_seconds']:.2f}x"
    )
    print(
        "  (whole command = process start, XAPI login, snapshot, plugin call, data, commit,"
        " rotation; data phase = reading and storing the disk)"
    )
    print(
        f"  1 % incremental / full: {ratio_inc:.1%} (goal <= 3 %); data phase only "
        f"{incs[0.01]['data_seconds'] / full['data_seconds']:.1%}"
    )
    print(f"  10 % incremental / full: {incs[0.10]['seconds'] / full['seconds']:.1%}")
    print("\nwhere each command's time went (seconds; data = reading, storing, committing indexes)")
    order = ["python_start", "imports", "xapi_login", "repo_open", "find_vm", "lease_and_lookup",
             "cleanup_and_cbt", "snapshot", "choose_base", "open_exports", "data", "commit",
             "rotate", "revoke", "close", "exit"]  # fmt: skip
    seen = {k for _n, r in rows for k in r["phases"]}
    names = [k for k in order if k in seen] + sorted(seen - set(order))
    for _n, r in rows:  # the CLI's own work outside the job: argument parsing, output
        r["phases"]["other"] = max(0.0, r["seconds"] - sum(r["phases"].values()))
    names.append("other")
    print(f"  {'step':18}" + "".join(f" {n[:16]:>16}" for n, _r in rows))
    for k in names:
        print(f"  {k:18}" + "".join(f" {r['phases'].get(k, 0.0):16.3f}" for _n, r in rows))
    print(
        f"  stored by the full backup: {full['bytes_written'] / GB:.2f} GB "
        f"of {full['bytes_read'] / GB:.2f} GB read"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": size,
                    "allocated": allocated,
                    "host_side": host,
                    "copy_fdatasync_seconds": base_copy,
                    "vhd_bytes": vhd_bytes,
                    "full": full,
                    "incremental": {str(k): v for k, v in incs.items()},
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
