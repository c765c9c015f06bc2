"""bench/pool.py on a small pool: it runs, every VM is backed up alone and by the job, each
disk is read on the host the routing says (VM k on host k mod 3: local SRs, then the shared one
through the resident host), and the ratios it prints are the ones its own numbers give."""

import json
import subprocess
import sys


def test_bench_pool_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.pool", "--vms", "3", "--size", "8M", "--json"]
        + ["--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["job_ok"] and r["vms"] == 3 and len(r["singles"]) == 3
    assert [s["host"] for s in r["singles"]] == ["host1", "host2", "host3"]
    assert r["disks_per_host"] == {"host1": 1, "host2": 1, "host3": 1}
    total = sum(s["seconds"] for s in r["singles"])
    assert r["sum_single_seconds"] == round(total, 2)
    assert r["job_over_sum"] == round(r["job_seconds"] / total, 3)
    slowest = max(s["seconds"] for s in r["singles"])
    assert r["slowest_single"]["seconds"] == slowest
