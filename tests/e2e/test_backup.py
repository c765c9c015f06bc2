"""Backups of hostsim VMs through every transport, judged by XAPI's own export and qemu-img.

Each scenario: full backup -> restore equals the snapshot (export_raw_vdi of the snapshot VDI,
and the restored VHD read by qemu-img) -> guest writes -> incremental -> restore equals the new
snapshot -> SM's GC coalesces the chain -> guest writes -> incremental again -> the first restore
point still restores to its own content. Repositories: local and S3 (moto), plain and encrypted
(parametrized across scenarios, not the full cross product).
"""

import os

import pytest

from tests.e2e.conftest import MiB, fastpath, qemu_raw

SCENARIOS = [
    # transport, repository, encrypted, extra flags, VM position
    ("nbd", "local", False, [], 0),
    pytest.param("nbd", "s3", True, [], 1, marks=pytest.mark.slow),  # 13-23 s (moto)
    ("xapi-nbd", "local", True, ["--cbt"], 2),
    pytest.param("xapi-export", "s3", False, [], 3, marks=pytest.mark.slow),
]


def check_restore(sim, repo, rp_id, vdi, snap_vdi, tmp_path, name, expected=None, raw=True):
    """Restore `vdi` of `rp_id` as VHD (read back by qemu-img) and raw: both equal the snapshot
    as XAPI exports it."""
    if expected is None:
        expected = sim.export_raw(snap_vdi)
    vhd = tmp_path / f"{name}.vhd"
    fastpath("restore", repo, rp_id, "--disk", vdi, "-o", vhd)
    assert qemu_raw(vhd, tmp_path)[: len(expected)] == expected
    if raw:
        out = tmp_path / f"{name}.raw"
        fastpath("restore", repo, rp_id, "--disk", vdi, "-o", out)
        assert out.read_bytes() == expected
    return expected


@pytest.mark.parametrize(
    "transport,kind,encrypted,flags,vm_pos",
    SCENARIOS,
    ids=["nbd-local-plain", "nbd-s3-enc", "xapi-nbd-local-enc", "xapi-export-s3-plain"],
)
def test_full_incremental_coalesce_restore(
    sim, repo_factory, tmp_path, transport, kind, encrypted, flags, vm_pos
):
    repo = repo_factory(kind, encrypted)
    vm = sim.vm(vm_pos)
    vdi = sim.vm_disk(vm_pos)
    base = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", transport]
    others = set(sim.fastpath_snapshots(vm))  # other tests' repositories' snapshots of this VM

    r1 = fastpath(*base, *flags)
    (d1,) = r1["disks"]
    assert d1["transport"] == transport and not d1["incremental"]
    first = check_restore(sim, repo, r1["id"], vdi, d1["snapshot_vdi"], tmp_path, "full")
    assert set(sim.fastpath_snapshots(vm)) == others | {r1["snapshot"]}

    sim.write(vm, pattern="mixed", count=6, length=96 << 10, seed=11 + vm_pos)
    r2 = fastpath(*base, *flags)
    (d2,) = r2["disks"]
    assert d2["incremental"], d2
    # Only what changed was read: far less than the allocated disk.
    assert d2["bytes_read"] < d1["bytes_read"] or d1["bytes_read"] <= 6 * 2 * MiB
    check_restore(sim, repo, r2["id"], vdi, d2["snapshot_vdi"], tmp_path, "incr", raw=not encrypted)
    # Rotation: the previous snapshot is gone, the new one is the next base.
    assert set(sim.fastpath_snapshots(vm)) == others | {r2["snapshot"]}

    actions = sim.gc()
    assert any(a[0] == "coalesce" for a in actions), actions
    sim.write(vm, pattern="text", count=4, length=64 << 10, seed=21 + vm_pos)
    r3 = fastpath(*base, *flags)
    (d3,) = r3["disks"]
    assert d3["incremental"], d3
    check_restore(sim, repo, r3["id"], vdi, d3["snapshot_vdi"], tmp_path, "coalesced")
    # Restore points are self-contained: the first still restores to its own content.
    check_restore(sim, repo, r1["id"], vdi, None, tmp_path, "again", expected=first, raw=False)
    fastpath("verify", repo)


@pytest.mark.parametrize("transport", ["nbd", "xapi-nbd"])
def test_cbt_purge_keeps_only_cbt_metadata(sim, repo_factory, tmp_path, transport):
    repo = repo_factory("local")
    vm_pos = 0 if transport == "nbd" else 1
    vm, vdi = sim.vm(vm_pos), sim.vm_disk(vm_pos)
    base = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", transport]
    others = set(sim.fastpath_snapshots(vm))  # other tests' repositories' snapshots of this VM
    r1 = fastpath(*base, "--cbt", "--cbt-purge")
    live = sim.export_raw(vdi)  # no writes since the snapshot: same content
    snap = sim.x.VDI.get_by_uuid(r1["disks"][0]["snapshot_vdi"])
    assert sim.x.VDI.get_type(snap) == "cbt_metadata"
    check_restore(sim, repo, r1["id"], vdi, None, tmp_path, "p1", expected=live)

    sim.write(vm, pattern="random", count=3, length=64 << 10, seed=5)
    r2 = fastpath(*base, "--cbt", "--cbt-purge")
    (d2,) = r2["disks"]
    assert d2["incremental"] and d2["base_mode"] == "cbt", d2
    assert d2["blocks_read"] <= 3
    live = sim.export_raw(vdi)
    check_restore(sim, repo, r2["id"], vdi, None, tmp_path, "p2", expected=live)
    # the older CBT-only snapshot was removed, the newest stays as the next base
    assert set(sim.fastpath_snapshots(vm)) == others | {r2["snapshot"]}


def test_auto_prefers_the_agent_and_says_so(sim, repo_factory):
    repo = repo_factory("local")
    r = fastpath("backup", "vm", sim.vm(2), "--hostsim", sim.root, "--repo", repo)
    (d,) = r["disks"]
    assert d["transport"] in ("nbd", "http")
    assert any("auto" in n for n in d["notes"]), d["notes"]


def test_missing_base_falls_back_to_full_and_says_so(sim, repo_factory):
    repo = repo_factory("local")
    vm = sim.vm(3)
    base = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
    r1 = fastpath(*base)
    # Someone deletes our snapshot (the base) between two backups.
    snap = sim.x.VM.get_by_uuid(r1["snapshot"])
    vdis = [sim.x.VBD.get_VDI(v) for v in sim.x.VM.get_VBDs(snap)]
    sim.x.VM.destroy(snap)
    for v in vdis:
        sim.x.VDI.destroy(v)
    r2 = fastpath(*base)
    (d,) = r2["disks"]
    assert not d["incremental"]
    assert any("is gone: full" in n for n in d["notes"]), d["notes"]


def test_backup_vm_as_a_function(sim, repo_factory, tmp_path):
    """backup_vm with explicit parameters (a session, a target, an open repository, options), as
    a pool-wide job calls it: the result is the CLI's, full then incremental, and restores to
    the snapshot; options that cannot work are refused before anything is touched."""
    from orchestrator.cli import UsageError
    from orchestrator.jobs import xapi_session
    from orchestrator.jobs.backup import Tuning, VmBackupOptions, backup_vm
    from orchestrator.progress import Progress
    from orchestrator.repo.repository import Repository

    url = repo_factory("local")
    vm, vdi = sim.vm(1), sim.vm_disk(1)
    others = set(sim.fastpath_snapshots(vm))  # other tests' repositories' snapshots of this VM
    target = xapi_session.XapiTarget(sim.url, "root", "hostsim")
    session = xapi_session.connect(target)
    ui = Progress("quiet")
    options = VmBackupOptions(transport="nbd", tuning=Tuning(connections=2))
    try:
        with Repository.open(url) as repo:
            bad = VmBackupOptions(transport="xapi-export", cbt_purge=True)
            with pytest.raises(UsageError, match="cbt-purge"):
                backup_vm(session, target, repo, vm, bad, ui=ui)
            assert set(sim.fastpath_snapshots(vm)) == others
            r1 = backup_vm(session, target, repo, vm, options, ui=ui)
            sim.write(vm, pattern="mixed", count=4, length=64 << 10, seed=31)
            r2 = backup_vm(session, target, repo, vm, options, ui=ui)
    finally:
        xapi_session.logout(session)
    (d1,), (d2,) = r1["disks"], r2["disks"]
    assert d1["transport"] == "nbd" and not d1["incremental"]
    assert d2["incremental"] and d2["bytes_read"] < d1["bytes_read"], (d1, d2)
    assert {"snapshot", "choose_base", "data", "commit", "rotate"} <= set(r2["phases"])
    check_restore(sim, url, r2["id"], vdi, d2["snapshot_vdi"], tmp_path, "function")
    assert set(sim.fastpath_snapshots(vm)) == others | {r2["snapshot"]}
    cli = fastpath("backup", "vm", vm, "--hostsim", sim.root, "--repo", url, "--transport", "nbd")
    assert set(cli) - {"_stderr"} == set(r2)
    assert cli["disks"][0]["incremental"]


def test_backup_vdi_from_a_vhd_file(repo_factory, tmp_path):
    import subprocess

    vhd = tmp_path / "disk.vhd"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(vhd), "12M"],
        check=True,
    )
    subprocess.run(
        ["qemu-io", "-f", "vpc", "-c", "write -P 0x61 1M 3M", "-c", "write -P 0 5M 1M", str(vhd)],
        check=True,
        capture_output=True,
    )
    repo = repo_factory("local")
    r = fastpath("backup", "vdi", "--source", vhd, "--repo", repo)
    (d,) = r["disks"]
    out = tmp_path / "out.raw"
    fastpath("restore", repo, r["id"], "-o", out)
    assert out.read_bytes() == qemu_raw(vhd, tmp_path)
    assert d["stats"]["chunks_zero"] >= 1  # the written zero block is not stored


def test_http_transport_full_and_incremental(sim, repo_factory, tmp_path):
    http = (sim.info.get("agent") or {}).get("http") or [None, 0]
    assert http[1], "the agent in hostsim serves HTTP (its ready file says port %r)" % (http,)
    repo = repo_factory("local")
    vm, vdi = sim.vm(1), sim.vm_disk(1)
    base = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "http"]
    r1 = fastpath(*base)
    assert r1["disks"][0]["transport"] == "http"
    check_restore(sim, repo, r1["id"], vdi, r1["disks"][0]["snapshot_vdi"], tmp_path, "h1")
    sim.write(vm, pattern="binary", count=3, length=128 << 10, seed=7)
    r2 = fastpath(*base)
    assert r2["disks"][0]["incremental"]
    check_restore(sim, repo, r2["id"], vdi, r2["disks"][0]["snapshot_vdi"], tmp_path, "h2")


def test_restore_to_xapi_creates_a_vdi_with_the_content(sim, repo_factory):
    repo = repo_factory("local")
    vm, vdi = sim.vm(2), sim.vm_disk(2)
    r = fastpath("backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd")
    expected = sim.export_raw(r["disks"][0]["snapshot_vdi"])
    out = fastpath(
        "restore",
        repo,
        r["id"],
        "--to-xapi",
        sim.url,
        "--hostsim",
        sim.root,
        "--sr",
        sim.info["sr"]["uuid"],
    )
    (d,) = out["disks"]
    assert d["vdi"] == vdi and d["new_vdi"] != vdi
    assert sim.export_raw(d["new_vdi"]) == expected


def test_restore_to_an_https_xapi_verifies_its_certificate(tmp_path, repo_factory):
    """Production XAPI is HTTPS with the pool's own certificate: the restore's import_raw_vdi PUT
    must trust what the session trusts (--xapi-cafile / hostsim.json's CA), not the system store."""
    from agent import vhd
    from tests.e2e.conftest import Sim

    sim = Sim(tmp_path / "tls-pool", vms=1, tls=True)
    try:
        assert sim.url.startswith("https://")
        repo = repo_factory("local")
        r = fastpath("backup", "vm", sim.vm(0), "--hostsim", sim.root, "--repo", repo)
        out = fastpath(
            "restore",
            repo,
            r["id"],
            "--to-xapi",
            sim.url,
            "--xapi-cafile",
            sim.info["xapi"]["cafile"],
            "--user",
            "root",
            "--password",
            "hostsim",
            "--sr",
            sim.info["sr"]["uuid"],
        )
        (d,) = out["disks"]

        def raw(vdi):
            path = os.path.join(sim.info["sr"]["path"], vdi + ".vhd")
            with vhd.open_chain(path) as chain:
                return chain.read(0, chain.size)

        assert raw(d["new_vdi"]) == raw(r["disks"][0]["snapshot_vdi"])
    finally:
        sim.stop()


def test_agent_refusing_the_base_falls_back_to_full(sim, repo_factory, monkeypatch, tmp_path):
    """A base the agent cannot diff against (here: another VM's disk, not an ancestor) is refused
    by the agent; the job does a full backup and says so."""
    from orchestrator.jobs.backup import vm as backup_vm

    repo = repo_factory("local")
    vm, vdi = sim.vm(0), sim.vm_disk(0)
    args = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
    fastpath(*args)
    orig = backup_vm._choose_base

    def wrong_base(ctx, repo_, disk, point, prev):
        orig(ctx, repo_, disk, point, prev)
        assert disk.base_mode == "agent"
        disk.agent_base = sim.vm_disk(3)

    monkeypatch.setattr(backup_vm, "_choose_base", wrong_base)
    r = fastpath(*args)
    (d,) = r["disks"]
    assert not d["incremental"]
    assert any("refused base" in n for n in d["notes"]), d["notes"]
    check_restore(sim, repo, r["id"], vdi, d["snapshot_vdi"], tmp_path, "refused")


def test_restore_to_stdout_and_a_damaged_chunk(repo_factory, tmp_path):
    """-o - streams raw bytes; a chunk whose bytes changed in the repository is caught by its
    digest: exit 1, and no output file is left behind."""
    import glob
    import os
    import subprocess
    import sys

    from tests.e2e.conftest import ROOT

    vhd = tmp_path / "disk.vhd"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(vhd), "6M"],
        check=True,
    )
    subprocess.run(
        ["qemu-io", "-f", "vpc", "-c", "write -P 0x61 0 3M", str(vhd)],
        check=True,
        capture_output=True,
    )
    repo = repo_factory("local")
    r = fastpath("backup", "vdi", "--source", vhd, "--repo", repo)
    expected = qemu_raw(vhd, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "restore", repo, r["id"], "-o", "-"],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected
    # Damage one stored chunk (keep its length: only the digest can tell).
    chunk = sorted(glob.glob(os.path.join(repo, "chunks", "*", "*")))[0]
    data = bytearray(open(chunk, "rb").read())
    data[-1] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    target = tmp_path / "damaged.raw"
    res = fastpath("restore", repo, r["id"], "-o", target, expect=1)
    assert "chunk" in res["error"], res
    assert not target.exists() and not (tmp_path / "damaged.raw.part").exists()
