"""`fastpath bench --xapi URL --vm UUID` (the real-pool mode), pointed at a simulated pool: it reads
through the plugin, export_raw_vdi and xapi-nbd, backs up full + inc0, and leaves the pool as it
found it apart from its own (destroyed) snapshots: same snapshots, same disk, same bytes (read back
through XAPI's own export, not through anything the bench used to measure)."""

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlencode

import pytest

from orchestrator.benchcmd import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def pool(tmp_path):
    root = tmp_path / "pool"
    log = open(tmp_path / "hostpool.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.benchcmd.hostpool", "--root", str(root)]
        + ["--size", "8M"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    state = root / "hostsim.json"
    deadline = time.monotonic() + 120
    while not state.exists():
        assert proc.poll() is None, (tmp_path / "hostpool.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "hostpool did not start"
        time.sleep(0.1)
    try:
        yield json.loads(state.read_text())
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def disk_state(info, vm_uuid):
    import XenAPI

    s = XenAPI.Session(info["xapi"]["url"])
    s.xenapi.login_with_password("root", "hostsim", "2.21", "test")
    try:
        x = s.xenapi
        vm = x.VM.get_by_uuid(vm_uuid)
        snaps = sorted(x.VM.get_snapshots(vm))
        vdis = []
        for vbd in x.VM.get_VBDs(vm):
            vdi = x.VBD.get_VDI(vbd)
            uuid = x.VDI.get_uuid(vdi)
            q = urlencode({"session_id": s._session, "vdi": uuid, "format": "raw"})
            with urllib.request.urlopen(f"{info['xapi']['url']}/export_raw_vdi?{q}") as r:
                vdis.append((uuid, hashlib.sha256(r.read()).hexdigest()))
        return snaps, vdis
    finally:
        s.xenapi.session.logout()


@pytest.mark.slow
def test_real_pool_mode_measures_and_leaves_the_pool_as_it_was(pool, tmp_path):
    vm = pool["bench"]["chain3"]["vm"]
    before = disk_state(pool, vm)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "--xapi", pool["xapi"]["url"]]
        + ["--vm", vm, "--password", "hostsim", "--runs", "1", "--transports", "nbd,xapi-export"]
        + ["--out", str(out), "--json", "--progress", "quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert disk_state(pool, vm) == before  # no snapshot left, same disks, same bytes
    assert report.check_consistency(result) == []
    host = {r["id"] for r in result["questions"]["host_side"]["rows"]}
    assert {"host/disk0/agent-nbd", "host/disk0/agent-http-blocks"} <= host
    assert {"host/disk0/xapi-export", "host/disk0/xapi-nbd"} <= host
    e2e = {r["id"]: r for r in result["questions"]["end_to_end"]["rows"]}
    for rid in ("e2e/vm/nbd/local/full", "e2e/vm/nbd/local/inc0", "e2e/vm/xapi-export/local/full"):
        assert e2e[rid]["vs_limit"] is not None
    # the disk's size as XAPI's export carried it (allocated blocks), not the snapshot's own file
    assert result["disks"]["disk0"]["allocated_bytes"] == pool["bench"]["chain3"]["allocated_bytes"]
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
