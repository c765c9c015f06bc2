"""Per-command work of `fastpath backup vm` moved off the critical path must still happen:
the export tickets (revoked in the background, overlapping the snapshot rotation) are all
revoked by the time the command returns (full and incremental)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.conftest import ROOT, fastpath


def agent_tickets(sim) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "ticket", "list", "--json"]
        + ["--admin-socket", sim.info["agent"]["admin_socket"]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    ).stdout
    doc = json.loads(out)
    return doc["tickets"] if isinstance(doc, dict) else doc


def test_tickets_are_revoked_when_backup_returns(sim, repo_factory):
    repo = repo_factory("local")
    vm = sim.vm(1)
    before = {t["id"] for t in agent_tickets(sim)}
    args = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
    for _ in range(2):  # full, then incremental (a ticket with a base)
        r = fastpath(*args)
        snaps = {d["snapshot_vdi"] for d in r["disks"]}
        mine = [t for t in agent_tickets(sim) if t["id"] not in before and t["vdi"] in snaps]
        assert len(mine) == len(snaps), mine  # one ticket per disk was opened
        assert all(t["revoked"] for t in mine), mine
        before |= {t["id"] for t in mine}


def test_disks_opened_in_parallel_back_up_and_restore(sim, repo_factory, tmp_path):
    """A VM given a second disk: both sources are opened at once (each on its own XAPI
    connection), both disks are backed up through the agent, full then incremental, every
    ticket is revoked, and each disk restores to what XAPI's export gives."""
    x = sim.x
    vm = sim.vm(2)
    vm_ref = x.VM.get_by_uuid(vm)
    first = x.VDI.get_by_uuid(sim.vm_disk(2))
    sr = x.VDI.get_SR(first)
    extra = x.VDI.create({"SR": sr, "virtual_size": str(6 << 20), "name_label": "data"})
    x.VBD.create({"VM": vm_ref, "VDI": extra, "userdevice": "1", "mode": "RW"})
    sim.write(vm, count=6, length=256 << 10, seed=11)
    repo = repo_factory("local")
    args = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
    before = {t["id"] for t in agent_tickets(sim)}
    for step in ("full", "incremental"):
        r = fastpath(*args)
        assert len(r["disks"]) == 2, r
        for d in r["disks"]:
            assert d["transport"] == "nbd", d
            assert d["incremental"] == (step == "incremental"), d
        snaps = {d["snapshot_vdi"] for d in r["disks"]}
        mine = [t for t in agent_tickets(sim) if t["id"] not in before and t["vdi"] in snaps]
        assert len(mine) == 2 and all(t["revoked"] for t in mine), mine
        before |= {t["id"] for t in mine}
        for d in r["disks"]:
            out = tmp_path / f"{step}-{d['vdi']}.raw"
            fastpath("restore", repo, r["id"], "--disk", d["vdi"], "-o", out)
            expected = sim.export_raw(d["snapshot_vdi"])
            assert out.read_bytes()[: len(expected)] == expected
        sim.write(vm, count=3, length=128 << 10, seed=12)


def test_json_result_says_where_the_time_went(sim, repo_factory):
    """`backup vm --json` carries ``phases``: seconds per step in the order the job runs
    them, each a real measurement (the data step carries the copy; the steps add up to no more
    than the command's own wall time)."""
    repo = repo_factory("local")
    r = fastpath("backup", "vm", sim.vm(1), "--hostsim", sim.root, "--repo", repo)
    phases = r["phases"]
    expected = {
        "xapi_login", "repo_open", "find_vm", "lease_and_lookup", "cleanup_and_cbt",
        "snapshot", "choose_base", "open_exports", "data", "commit", "rotate", "revoke", "close",
    }  # fmt: skip
    assert set(phases) == expected, phases
    assert all(isinstance(v, float) and v >= 0 for v in phases.values()), phases
    assert phases["data"] > 0 and phases["open_exports"] > 0, phases
    assert phases["data"] >= max(d["seconds"] for d in r["disks"]) - 0.01, (phases, r["disks"])
    assert (
        sum(phases.values())
        <= r["seconds"] + sum(phases[k] for k in ("xapi_login", "repo_open", "close")) + 0.01
    )


def agent_http_requests(sim) -> dict[str, int]:
    """The agent's HTTP request counters by status, from its /metrics."""
    import re
    import ssl
    import urllib.request

    host, port = sim.info["agent"]["http"][:2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the counters are not secret; the test reads its own agent
    url = f"https://{host}:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=30, context=ctx).read().decode()
    return {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'fastpath_http_requests_total\{status="(\d+)"\} (\S+)', text)
    }


def test_nbd_backup_revokes_its_tickets_at_the_agent(sim, repo_factory):
    """An NBD backup makes no HTTP request for data, yet its tickets end up revoked with one
    HTTP request each (DELETE of the export at the agent), not through a plugin call."""
    repo = repo_factory("local")
    vm = sim.vm(3)
    before = agent_http_requests(sim).get("200", 0)
    known = {t["id"] for t in agent_tickets(sim)}
    r = fastpath("backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd")
    snaps = {d["snapshot_vdi"] for d in r["disks"]}
    mine = [t for t in agent_tickets(sim) if t["id"] not in known and t["vdi"] in snaps]
    assert mine and all(t["revoked"] for t in mine), mine
    # + 1: the first /metrics request is counted after it answered
    assert agent_http_requests(sim).get("200", 0) - before == len(mine) + 1
