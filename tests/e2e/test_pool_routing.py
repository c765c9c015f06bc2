"""Backups of a pool of three simulated hosts (``hostsim serve --hosts 3 --no-agent-on 2``)
through the real XenAPI SDK: each disk's ticket is asked of the host that can read its SR, and
the proof is taken from the agents themselves (their own log of the tickets they created and
their own byte counters), not from the backup's success:

- a VM on a non-master host's local SR is read through that host's agent, never the master's;
- a host without the agent: its local-SR VM falls back to the XAPI way (auto) and the job's
  report says which host, which transport and why; its shared-SR VM is read through another
  host's agent;
- a VM on the shared SR migrated between two runs (VM.pool_migrate): the next backup is an
  incremental on the right base, read on the VM's new host, and restores to the snapshot's bytes.
"""

import json
import socket

import pytest

from tests.e2e.conftest import Sim, fastpath


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    s = Sim(
        tmp_path_factory.mktemp("pool3"),
        vms=6,
        disk_size="8M",
        extra=["--hosts", "3", "--no-agent-on", "2"],
    )
    yield s
    s.stop()


def tickets_created(host, vdi=None):
    """Tickets the host's agent says (in its own log) it created, for ``vdi`` or any VDI."""
    path = host["agent_log"]
    if not path:
        return 0
    with open(path, errors="replace") as f:
        return sum(1 for line in f if "created for VDI" in line and (vdi is None or vdi in line))


def admin(host, op):
    """One request to the host's agent's admin socket."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(host["agent"]["admin_socket"])
    try:
        s.sendall(json.dumps({"op": op}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            buf += s.recv(65536)
    finally:
        s.close()
    return json.loads(buf)


def bytes_served(host):
    """Data bytes the host's agent sent (its admin API's counters)."""
    if not host["agent"]:
        return 0
    stats = admin(host, "stats")["stats"]
    return sum(stats.get(f"{m}_bytes", 0) for m in ("sendfile", "pread", "assembled"))


def hosts_by_name(pool):
    return {h["name"]: h for h in pool.info["hosts"]}


def test_local_sr_of_a_non_master_host_goes_through_its_agent(pool, tmp_path):
    hosts = hosts_by_name(pool)
    vm = pool.info["vms"][1]  # vm2: resident on host2, disk on host2's local SR
    assert vm["host"] == hosts["host2"]["uuid"] and vm["sr"] == hosts["host2"]["sr"]["uuid"]
    repo = tmp_path / "repo"
    fastpath("repo", "init", repo)
    before = {n: (tickets_created(h), bytes_served(h)) for n, h in hosts.items()}
    res = fastpath("backup", "vm", vm["uuid"], "--hostsim", pool.root, "--repo", repo)
    (disk,) = res["disks"]
    assert disk["transport"] == "nbd"
    assert disk["host"]["name"] == "host2" and disk["host"]["uuid"] == hosts["host2"]["uuid"]
    assert "local SR of host2" in disk["host"]["route"]
    snap = disk["snapshot_vdi"]
    assert tickets_created(hosts["host2"], snap) == 1
    assert tickets_created(hosts["host1"], snap) == 0
    assert tickets_created(hosts["host1"]) == before["host1"][0]
    assert bytes_served(hosts["host2"]) - before["host2"][1] >= res["bytes_read"] > 0
    assert bytes_served(hosts["host1"]) == before["host1"][1]
    # the ticket was revoked where it was opened: host2's agent holds none for the snapshot
    live = admin(hosts["host2"], "list_tickets")["tickets"]
    assert [t for t in live if t["vdi"] == snap and not t["revoked"]] == []


def job_file(tmp_path, pool, body):
    (tmp_path / "pw").write_text("hostsim\n")
    p = tmp_path / "pool.toml"
    p.write_text(
        f'name = "pool"\nrepository = "{tmp_path / "repo"}"\nxapi = "{pool.url}"\n'
        f'user = "root"\npassword-file = "pw"\n' + body
    )
    return p


def test_host_without_agent_falls_back_and_the_report_says_so(pool, tmp_path):
    hosts = hosts_by_name(pool)
    vms = pool.info["vms"]
    # vm1: host1's local SR; vm3: host3's local SR (host3 has no agent); vm6: shared, on host3
    picked = [vms[0], vms[2], vms[5]]
    assert vms[2]["host"] == vms[5]["host"] == hosts["host3"]["uuid"]
    fastpath("repo", "init", tmp_path / "repo")
    names = ", ".join(f'"{v["name"]}"' for v in picked)
    job = job_file(tmp_path, pool, f"vms = [{names}]\nmax-vms = 3\n")
    before = {n: tickets_created(h) for n, h in hosts.items()}
    report = fastpath("job", "run", job)
    assert report["ok"], report
    rows = {r["name"]: r for r in report["vms"]}

    local3 = rows["vm3"]
    assert local3["transport"] == "xapi-nbd" and local3["fallback"] is True
    assert local3["read_on"] == "host3"
    (d,) = local3["disks"]
    assert d["host"] == "host3" and d["transport"] == "xapi-nbd"
    assert "local SR of host3" in d["route"]
    assert "agent plugin on host3: XENAPI_MISSING_PLUGIN" in local3["why"]
    # XAPI's own NBD of host3 (the only host with that SR): its address, from get_nbd_info
    assert f"read from xapi-nbd {hosts['host3']['address']}:" in local3["why"]

    shared3 = rows["vm6"]
    (d,) = shared3["disks"]
    assert shared3["transport"] == "nbd" and shared3["fallback"] is False
    assert d["host"] in ("host1", "host2") and shared3["read_on"] == d["host"]
    assert "host3" in d["route"] + d["why"]  # skipped host3, and says so

    assert rows["vm1"]["read_on"] == "host1" and rows["vm1"]["transport"] == "nbd"
    # the agents' own account: host3 has none; vm6's ticket was made where the report says
    assert tickets_created(hosts[d["host"]]) > before[d["host"]]
    assert hosts["host3"]["agent"] is None
    text = __import__("orchestrator.jobs.job", fromlist=["render_report"]).render_report(report)
    assert "host3" in text and "xapi-nbd" in text


def test_migrated_vm_next_incremental_uses_the_right_base_and_host(pool, tmp_path):
    hosts = hosts_by_name(pool)
    vm = pool.info["vms"][4]  # vm5: shared SR, resident on host2
    assert vm["host"] == hosts["host2"]["uuid"] and vm["sr"] == pool.info["shared_sr"]["uuid"]
    repo = tmp_path / "repo"
    fastpath("repo", "init", repo)
    first = fastpath("backup", "vm", vm["uuid"], "--hostsim", pool.root, "--repo", repo)
    (d1,) = first["disks"]
    assert d1["host"]["name"] == "host2" and "resident on host2" in d1["host"]["route"]
    assert tickets_created(hosts["host2"], d1["snapshot_vdi"]) == 1

    x = pool.x
    ref = x.VM.get_by_uuid(vm["uuid"])
    x.VM.pool_migrate(ref, x.host.get_by_uuid(hosts["host1"]["uuid"]), {})
    assert x.VM.get_resident_on(ref) == x.host.get_by_uuid(hosts["host1"]["uuid"])
    pool.write(vm["uuid"], pattern="text", count=3, length=65536, seed=5)

    master_before = tickets_created(hosts["host1"])
    host2_before = tickets_created(hosts["host2"])
    second = fastpath("backup", "vm", vm["uuid"], "--hostsim", pool.root, "--repo", repo)
    (d2,) = second["disks"]
    assert d2["host"]["name"] == "host1" and "resident on host1" in d2["host"]["route"]
    assert d2["incremental"] and d2["base_mode"] == "agent" and d2["transport"] == "nbd"
    assert tickets_created(hosts["host1"], d2["snapshot_vdi"]) == 1
    assert tickets_created(hosts["host1"]) == master_before + 1
    assert tickets_created(hosts["host2"]) == host2_before
    # the right base: only the changed blocks were read, and the point restores to the bytes
    # of the new snapshot as XAPI's own export gives them
    assert 0 < d2["blocks_read"] < d1["blocks_read"]
    out = tmp_path / "restored.raw"
    fastpath("restore", repo, second["id"], "--disk", d2["vdi"], "-o", out)
    assert out.read_bytes() == pool.export_raw(d2["snapshot_vdi"])


def test_halted_vm_on_the_shared_sr_is_read_on_an_attached_host(pool, tmp_path):
    hosts = hosts_by_name(pool)
    vm = pool.info["vms"][3]  # vm4: shared SR
    x = pool.x
    ref = x.VM.get_by_uuid(vm["uuid"])
    x.VM.hard_shutdown(ref)
    try:
        assert x.VM.get_resident_on(ref) == "OpaqueRef:NULL"
        repo = tmp_path / "repo"
        fastpath("repo", "init", repo)
        res = fastpath("backup", "vm", vm["uuid"], "--hostsim", pool.root, "--repo", repo)
        (d,) = res["disks"]
        assert "VM not running: least loaded attached host" in d["host"]["route"]
        assert d["transport"] == "nbd" and d["host"]["name"] in ("host1", "host2")
        assert tickets_created(hosts[d["host"]["name"]], d["snapshot_vdi"]) == 1
    finally:
        x.VM.start(ref, False, False)
