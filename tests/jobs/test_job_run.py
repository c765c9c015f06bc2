"""``fastpath job run/check`` against a real ``hostsim serve`` through the XenAPI SDK:
selection by tag (picked up at each run), the concurrency limits (judged from the rows'
recorded start/end times), a VM deleted between selection and snapshot (a failed row, the
others committed, exit 1), retention on the job's VMs only, the textfile and webhook sinks,
an unreachable master, a tag matching nothing."""

import json
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.jobs.job import render_report, runner
from tests.e2e.conftest import Sim, fastpath
from tests.jobs.test_job_file import Hook


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = Sim(tmp_path_factory.mktemp("hostsim"), vms=4, disk_size="4M")
    yield s
    s.stop()


def job_file(tmp_path, sim, body, name="tagged"):
    (tmp_path / "pw").write_text("hostsim\n")
    p = tmp_path / f"{name}.toml"
    p.write_text(
        f'name = "{name}"\nrepository = "repo"\nxapi = "{sim.url}"\nuser = "root"\n'
        f'password-file = "pw"\n' + body
    )
    return p


def set_tags(sim, k, tags):
    sim.x.VM.set_tags(sim.x.VM.get_by_uuid(sim.vm(k)), tags)


def halted_clone(sim, k, name):
    """A halted copy of VM ``k`` named ``name`` (XAPI clones halted VMs only)."""
    ref = sim.x.VM.get_by_uuid(sim.vm(k))
    sim.x.VM.hard_shutdown(ref)
    try:
        return sim.x.VM.clone(ref, name)
    finally:
        sim.x.VM.start(ref, False, False)


def overlaps(rows):
    """The most rows running at one instant (from their start/end timestamps)."""
    events = sorted([(r["started"], 1) for r in rows] + [(r["ended"], -1) for r in rows])
    most = cur = 0
    for _t, d in events:
        cur += d
        most = max(most, cur)
    return most


def test_tags_limits_retention_sinks(sim, tmp_path, monkeypatch):
    fastpath("repo", "init", tmp_path / "repo")
    for k in range(4):
        set_tags(sim, k, [])
    set_tags(sim, 0, ["nightly"])
    set_tags(sim, 1, ["nightly", "other"])
    hook = __import__("http.server").server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    Hook.bodies, Hook.fail_first = [], 0
    job = job_file(
        tmp_path,
        sim,
        'tags = ["nightly", "nosuchtag"]\nmax-vms = 2\nmax-per-host = 2\n'
        "[retention]\nkeep-last = 1\n"
        f'[report]\ntextfile = "m.prom"\nwebhook = "http://127.0.0.1:{hook.server_port}/h"\n',
    )
    chk = fastpath("job", "check", job)
    assert sorted(v["vm"] for v in chk["vms"]) == sorted([sim.vm(0), sim.vm(1)])
    assert chk["warnings"] == ["tag 'nosuchtag' matches no VM"]

    # a VM outside the job with a restore point of its own: retention must not touch it
    outsider = fastpath(
        "backup", "vm", sim.vm(3), "--hostsim", sim.root, "--repo", tmp_path / "repo"
    )
    fastpath("backup", "vm", sim.vm(3), "--hostsim", sim.root, "--repo", tmp_path / "repo")

    r1 = fastpath("job", "run", job, "--report-json", tmp_path / "r.json")
    assert r1["ok"] and r1["totals"] == {**r1["totals"], "vms": 2, "ok": 2, "failed": 0}
    assert {row["kind"] for row in r1["vms"]} == {"full"}
    assert all(row["transport"] == "nbd" and row["bytes_read"] > 0 for row in r1["vms"])
    assert overlaps(r1["vms"]) <= 2
    assert json.loads((tmp_path / "r.json").read_text())["vms"] == r1["vms"]

    # newly tagged VM is picked up; per host 1 (one simulated host) => never two at once
    set_tags(sim, 2, ["nightly"])
    job.write_text(job.read_text().replace("max-per-host = 2", "max-per-host = 1"))
    r2 = fastpath("job", "run", job)
    assert len(r2["vms"]) == 3 and r2["ok"]
    assert overlaps(r2["vms"]) == 1
    kinds = {row["vm"]: row["kind"] for row in r2["vms"]}
    assert kinds[sim.vm(0)] == "incremental" and kinds[sim.vm(2)] == "full"
    assert r2["retention"]["deleted"] == 2  # the first run's points of VMs 0 and 1
    listing = fastpath("list", tmp_path / "repo")
    per_vm = {}
    for p in listing["restore_points"]:
        per_vm[p["vm"]] = per_vm.get(p["vm"], 0) + 1
    assert per_vm[sim.vm(3)] == 2 and per_vm[sim.vm(0)] == 1 and per_vm[sim.vm(2)] == 1
    assert outsider["id"] in {p["id"] for p in listing["restore_points"]}

    fams = {f.name: f for f in text_string_to_metric_families((tmp_path / "m.prom").read_text())}
    ok = {s.labels["vm"]: s.value for s in fams["fastpath_vm_backup_success"].samples}
    assert ok == {sim.vm(k): 1.0 for k in range(3)}
    ages = fams["fastpath_vm_newest_restore_point_age_seconds"].samples
    assert len(ages) == 3 and all(s.value >= 0 for s in ages)
    assert fams["fastpath_job_last_run_end_timestamp_seconds"].samples[0].value == r2["ended"]
    assert [b["job"] for b in Hook.bodies] == ["tagged", "tagged"]
    assert r2["webhook"]["ok"]
    hook.shutdown()
    hook.server_close()


def test_vm_deleted_after_selection(sim, tmp_path, monkeypatch):
    """One VM vanishes between selection and its snapshot: its row fails with a one-line
    error, the others are committed, the job exits 1."""
    fastpath("repo", "init", tmp_path / "repo")
    victim_ref = halted_clone(sim, 3, "doomed")
    victim = sim.x.VM.get_uuid(victim_ref)
    job = job_file(tmp_path, sim, f'vms = ["{sim.vm(0)}", "doomed"]\n', name="del")
    real = runner.backup_vm

    def vanish(session, target, repo, vm_uuid, options, **kw):
        if vm_uuid == victim:
            ref = session.xenapi.VM.get_by_uuid(vm_uuid)
            if session.xenapi.VM.get_power_state(ref) != "Halted":
                session.xenapi.VM.hard_shutdown(ref)
            session.xenapi.VM.destroy(ref)
        return real(session, target, repo, vm_uuid, options, **kw)

    monkeypatch.setattr(runner, "backup_vm", vanish)
    r = fastpath("job", "run", job, expect=1)
    rows = {row["vm"]: row for row in r["vms"]}
    assert rows[sim.vm(0)]["result"] == "ok" and rows[sim.vm(0)]["id"]
    bad = rows[victim]
    assert bad["result"] == "failed" and victim in bad["error"] and "\n" not in bad["error"]
    assert "1 of 2 VM(s) failed: doomed" in r["error"]
    text = render_report(r).splitlines()
    assert text[0] == "job del: 1 of 2 VM(s) ok"
    assert any(ln.split()[:2] == ["doomed", "failed"] for ln in text[2:])
    ids = {p["id"] for p in fastpath("list", tmp_path / "repo")["restore_points"]}
    assert rows[sim.vm(0)]["id"] in ids


def test_unreachable_master(tmp_path):
    (tmp_path / "pw").write_text("x\n")
    job = tmp_path / "j.toml"
    job.write_text(
        'name = "j"\nrepository = "repo"\nxapi = "http://127.0.0.1:1"\npassword-file = "pw"\n'
        'pools = "all"\n'
    )
    r = fastpath("job", "run", job, expect=1)
    assert r["error"].startswith("cannot reach the pool master: XAPI http://127.0.0.1:1")


def test_names(sim, tmp_path):
    fastpath("repo", "init", tmp_path / "repo")
    name = sim.x.VM.get_name_label(sim.x.VM.get_by_uuid(sim.vm(1)))
    r = fastpath("backup", "vm", name, "--hostsim", sim.root, "--repo", tmp_path / "repo")
    assert r["vm"] == sim.vm(1)
    shown = fastpath("show", tmp_path / "repo", f"{name}/latest")
    assert shown["id"] == r["id"]
    assert fastpath("show", tmp_path / "repo", f"{sim.vm(1)}/latest")["id"] == r["id"]
    r2 = fastpath("show", tmp_path / "repo", "nosuch/latest", expect=1)
    assert "no restore point for VM nosuch" in r2["error"]
    r = fastpath(
        "backup", "vm", "vm2-nosuch", "--hostsim", sim.root, "--repo", tmp_path / "repo", expect=1
    )
    assert r["error"] == "no VM with uuid or name 'vm2-nosuch'"
    twin = halted_clone(sim, 1, name)
    try:
        r = fastpath(
            "backup", "vm", name, "--hostsim", sim.root, "--repo", tmp_path / "repo", expect=2
        )
        assert "2 VMs are named" in r["_stderr"] and sim.vm(1) in r["_stderr"]
    finally:
        if sim.x.VM.get_power_state(twin) != "Halted":
            sim.x.VM.hard_shutdown(twin)
        sim.x.VM.destroy(twin)


def test_full_every(sim, tmp_path):
    """full-every 2: a full, an incremental, then a full again (the last point was an
    incremental), judged from the metadata the runs committed."""
    fastpath("repo", "init", tmp_path / "repo")
    job = job_file(tmp_path, sim, f'vms = ["{sim.vm(2)}"]\nfull-every = 2\n', name="fe")
    kinds = [fastpath("job", "run", job)["vms"][0]["kind"] for _ in range(3)]
    assert kinds == ["full", "incremental", "full"]


def test_copy_to_after_each_run(sim, tmp_path):
    """copy-to: after the backups, the job's points reach the second repository (only what it
    lacks), restore identically from it; an unreachable copy target fails the job (exit 1)
    with the backups committed."""
    fastpath("repo", "init", tmp_path / "repo")
    fastpath("repo", "init", tmp_path / "offsite")
    body = f'vms = ["{sim.vm(3)}"]\ncopy-to = ["offsite"]\n'
    job = job_file(tmp_path, sim, body, name="cp")
    first = fastpath("job", "run", job)
    (copy,) = first["copies"]
    assert copy["ok"] and len(copy["result"]["copied"]) == 1 and copy["result"]["chunks_sent"]
    second = fastpath("job", "run", job)
    assert len(second["copies"][0]["result"]["copied"]) == 1  # only the new point
    for repo in ("repo", "offsite"):
        fastpath("restore", tmp_path / repo, f"{sim.vm(3)}/latest", "-o", tmp_path / f"{repo}.raw")
    assert (tmp_path / "repo.raw").read_bytes() == (tmp_path / "offsite.raw").read_bytes()
    bad = job_file(tmp_path, sim, f'vms = ["{sim.vm(3)}"]\ncopy-to = ["missing"]\n', name="cp2")
    out = fastpath("job", "run", bad, expect=1)
    assert out["ok"] is False and out["copies"][0]["ok"] is False
    assert out["vms"][0]["result"] == "ok" and "missing" in out["copies"][0]["error"]
