"""A VM with two disks on an in-process hostsim without the agent: `auto` falls back to XAPI's
NBD and says why, both disks are pulled in parallel, and restore writes each to a directory."""

import pytest

from tests.e2e.conftest import MiB, fastpath, qemu_raw


@pytest.fixture
def two_disk_vm(hostsim_pool):
    from hostsim import guest

    pool = hostsim_pool
    vm = pool.create_vm("two", [6 * MiB, 4 * MiB + 512 * 1024], running=True)
    for k, vdi in enumerate(pool.vm_vdis(vm)):
        guest.guest_write(pool, vdi, "mixed", count=5, length=192 << 10, seed=40 + k)
        pool.api.vdi__enable_cbt(vdi)
    st = pool.api.store
    return pool, st.field("VM", vm, "uuid"), [st.field("VDI", v, "uuid") for v in pool.vm_vdis(vm)]


def test_two_disks_auto_falls_back_to_xapi_nbd(two_disk_vm, repo_factory, tmp_path):
    pool, vm, vdis = two_disk_vm
    repo = repo_factory("local")
    xapi = ["--xapi", pool.server.url, "--user", "root", "--password", "hostsim"]
    r1 = fastpath("backup", "vm", vm, *xapi, "--repo", repo)
    assert sorted(d["vdi"] for d in r1["disks"]) == sorted(vdis)
    for d in r1["disks"]:
        assert d["transport"] == "xapi-nbd", d
        assert any("auto" in n and "nbd:" in n for n in d["notes"]), d["notes"]
    expected = {
        d["vdi"]: pool.sr.read(d["snapshot_vdi"], 0, pool.sr.info(d["vdi"])["virtual_size"])
        for d in r1["disks"]
    }
    out = tmp_path / "restored"
    out.mkdir()
    fastpath("restore", repo, r1["id"], "-o", out)
    for vdi in vdis:
        assert qemu_raw(out / f"{vdi}.vhd", tmp_path)[: len(expected[vdi])] == expected[vdi]
    # Without --disk and with a file as output, two disks are a usage error (exit 2).
    fastpath("restore", repo, r1["id"], "-o", tmp_path / "one.raw", expect=2)

    # Guest writes on one disk; CBT (xapi-nbd has no block status) reads only what changed.
    from hostsim import guest

    vdi_ref = pool.api.store.by_uuid_ref("VDI", vdis[1])
    guest.guest_write(pool, vdi_ref, "random", count=1, length=64 << 10, seed=99)
    r2 = fastpath("backup", "vm", vm, *xapi, "--repo", repo, "--transport", "xapi-nbd")
    by_vdi = {d["vdi"]: d for d in r2["disks"]}
    assert by_vdi[vdis[0]]["base_mode"] == by_vdi[vdis[1]]["base_mode"] == "cbt"
    assert by_vdi[vdis[0]]["blocks_read"] == 0
    assert by_vdi[vdis[1]]["blocks_read"] == 1
    d = by_vdi[vdis[1]]
    want = pool.sr.read(d["snapshot_vdi"], 0, pool.sr.info(vdis[1])["virtual_size"])
    raw = tmp_path / "d1.raw"
    fastpath("restore", repo, r2["id"], "--disk", vdis[1], "-o", raw)
    assert raw.read_bytes() == want
