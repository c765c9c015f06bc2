"""``python -m bench.pool``: one backup job over a pool of several hosts vs its VMs one at a time.

A simulated pool (``hostsim serve --hosts H``: each host with its own agent and local SR, a shared
SR on all; the VMs spread over the hosts, half of them on local SRs, half on the shared one) with
N VMs of SIZE made from one OS-like template. Measured in the same run, on the same pool:

1. each VM backed up alone, one after the other (``fastpath backup vm``, full, into one
   repository): the sum of their times is what a job with no parallelism would cost, the slowest
   of them is the floor no schedule can beat;
2. the same VMs by one job (``fastpath job run``, ``max-vms`` at once, ``max-per-host`` per host,
   full, into a fresh repository): each disk read on the host that can read its SR.

Printed: the job's wall time, the sum and the slowest of the single-VM times, the ratios
job / sum (lower is better; 1/max-vms would be perfect scaling) and job / slowest (1.0 would be
"as fast as the slowest VM alone"), and the disks read per host. Every time is the command's own
``seconds`` (login, snapshot, read, store, commit, rotate; not Python's start-up). The machine's
cores are shared by the hosts' agents, XAPI and the orchestrator: this measures the scheduling and
routing, not a pool of real hosts, whose agents each have their own dom0.

    .venv/bin/python -m bench.pool                          # 20 VMs x 1 GiB, 3 hosts, 3 at once
    .venv/bin/python -m bench.pool --vms 6 --size 64M --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _run(cmd: list[str], timeout: float = 3600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:6])}... failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return proc.stdout


def fastpath(*args: str) -> dict:
    out = _run([sys.executable, "-m", "orchestrator.cli", *args, "--json"])
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--size", default="1G", help="disk size of each VM (default 1G)")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--max-vms", type=int, default=3, help="the job's VMs at once (default 3)")
    ap.add_argument(
        "--max-per-host", type=int, default=1, help="the job's VMs per host (default 1)"
    )
    ap.add_argument("--workdir", help="where to build (default: a temporary directory, removed)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="fastpath-bench-pool-")
    os.makedirs(work, exist_ok=True)
    root = os.path.join(work, "pool")
    t0 = time.monotonic()
    _run(
        [sys.executable, "-m", "hostsim.cli", "serve", "--root", root, "--daemon"]
        + ["--hosts", str(args.hosts), "--vms", str(args.vms), "--disk-size", args.size]
        + ["--gc-interval", "0"]
    )
    build_seconds = time.monotonic() - t0
    try:
        with open(os.path.join(root, "hostsim.json")) as f:
            conf = json.load(f)
        os.environ["HOSTSIM_ROOT"] = root
        singles_repo = os.path.join(work, "repo-single")
        fastpath("repo", "init", singles_repo)
        singles = []
        for vm in conf["vms"]:
            res = fastpath("backup", "vm", vm["uuid"], "--repo", singles_repo, "--full")
            singles.append(
                {
                    "vm": vm["name"],
                    "seconds": res["seconds"],
                    "bytes_read": res["bytes_read"],
                    "host": res["disks"][0]["host"]["name"],
                }
            )
        job_repo = os.path.join(work, "repo-job")
        fastpath("repo", "init", job_repo)
        pw = os.path.join(work, "pw")
        with open(pw, "w") as f:
            f.write(conf["xapi"]["password"] + "\n")
        job = os.path.join(work, "pool.toml")
        with open(job, "w") as f:
            f.write(
                f'name = "bench-pool"\nrepository = "{job_repo}"\nxapi = "{conf["xapi"]["url"]}"\n'
                f'user = "{conf["xapi"]["user"]}"\npassword-file = "{pw}"\npools = "all"\n'
                f"max-vms = {args.max_vms}\nmax-per-host = {args.max_per_host}\n"
            )
        report = fastpath("job", "run", job)
    finally:
        subprocess.run(
            [sys.executable, "-m", "hostsim.cli", "stop", "--root", root],
            capture_output=True,
            timeout=300,
        )
    job_seconds = report["totals"]["seconds"]
    total = sum(s["seconds"] for s in singles)
    slowest = max(singles, key=lambda s: s["seconds"])
    per_host: dict[str, int] = {}
    for row in report["vms"]:
        for d in row["disks"]:
            per_host[d["host"]] = per_host.get(d["host"], 0) + 1
    result = {
        "vms": args.vms,
        "size": args.size,
        "hosts": args.hosts,
        "max_vms": args.max_vms,
        "max_per_host": args.max_per_host,
        "pool_build_seconds": round(build_seconds, 1),
        "bytes_read": report["totals"]["bytes_read"],
        "job_seconds": job_seconds,
        "sum_single_seconds": round(total, 2),
        "slowest_single": slowest,
        "job_over_sum": round(job_seconds / total, 3),
        "job_over_slowest": round(job_seconds / slowest["seconds"], 2),
        # what perfect scaling would give: the sequential sum shared by max_vms at once
        "best_over_slowest": round(total / args.max_vms / slowest["seconds"], 2),
        "disks_per_host": per_host,
        "job_ok": report["ok"],
        "singles": singles,
    }
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"pool: {args.hosts} hosts, {args.vms} VMs x {args.size} (built in "
        f"{build_seconds:.0f} s); {result['bytes_read'] / 1e9:.2f} GB read per pass"
    )
    print(
        f"  each VM alone, one after the other: sum {total:.1f} s, slowest "
        f"{slowest['seconds']:.1f} s ({slowest['vm']} on {slowest['host']})"
    )
    print(f"  one job, {args.max_vms} at once, {args.max_per_host} per host: {job_seconds:.1f} s")
    print(
        f"  job / sum of singles   = {result['job_over_sum']:.3f} "
        f"(perfect scaling: {1 / args.max_vms:.3f})"
    )
    print(
        f"  job / slowest VM alone = {result['job_over_slowest']:.2f} "
        f"(perfect scaling: {result['best_over_slowest']:.2f})"
    )
    print("  disks read per host: " + ", ".join(f"{h} {n}" for h, n in sorted(per_host.items())))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
