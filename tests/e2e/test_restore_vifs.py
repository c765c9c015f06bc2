"""Whole VMs with their networks: ``backup vm`` records the VIFs (network uuid and name-label,
MAC, device), ``restore --new-vm`` recreates them on the target pool's networks, with
``--network OLD=NEW``, ``--keep-macs``, a report of what could not be mapped, and
``--metadata-only`` (the VM and its VIFs, no disks). Everything is set up and checked through the
XenAPI SDK against hostsim (network.create, VIF.create as XAPI's constructor rules have them)."""

import pytest

from tests.e2e.conftest import MiB, fastpath
from tests.e2e.test_restore_new_vm import restore_new_vm


def net(x, name):
    return x.network.create(
        {"name_label": name, "name_description": "", "MTU": "1500", "other_config": {}}
    )


@pytest.fixture
def sdk(hostsim_pool):
    """A XenAPI SDK session on the hostsim pool."""
    import XenAPI

    s = XenAPI.Session(hostsim_pool.server.url)
    s.xenapi.login_with_password("root", "hostsim", "2.21", "test")
    yield s.xenapi
    s.xenapi.session.logout()


@pytest.fixture
def vm_with_vifs(hostsim_pool, sdk):
    pool = hostsim_pool
    api = pool.api
    x = sdk
    vm = pool.create_vm("router")
    uuid = pool.sr.create(4 * MiB)
    vdi = api.introduce_vdi(pool.sr_ref, uuid, name_label="router disk")
    api._new_vbd(vm, vdi, "0", "RW", True)
    lan, dmz, backend = net(x, "LAN"), net(x, "DMZ"), net(x, "backend")
    macs = {"0": "02:00:00:00:00:10", "1": "02:00:00:00:00:11", "2": "02:00:00:00:00:12"}
    for dev, network in (("0", lan), ("1", dmz), ("2", backend)):
        x.VIF.create(
            {
                "device": dev,
                "network": network,
                "VM": vm,
                "MAC": macs[dev],
                "MTU": "1500",
                "other_config": {},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            }
        )
    vm_uuid = x.VM.get_uuid(vm)
    nets = {n: x.network.get_uuid(r) for n, r in (("LAN", lan), ("DMZ", dmz), ("backend", backend))}
    return pool, x, vm_uuid, nets, macs, {"lan": lan, "dmz": dmz, "backend": backend}


def vifs_of(x, vm_uuid):
    ref = x.VM.get_by_uuid(vm_uuid)
    recs = [x.VIF.get_record(v) for v in x.VM.get_VIFs(ref)]
    return {
        r["device"]: (x.network.get_name_label(r["network"]), r["MAC"])
        for r in sorted(recs, key=lambda r: r["device"])
    }


def test_vifs_recorded_and_recreated(vm_with_vifs, repo_factory):
    pool, x, vm_uuid, nets, macs, refs = vm_with_vifs
    repo = repo_factory("local")
    r = fastpath(
        "backup",
        "vm",
        vm_uuid,
        "--xapi",
        pool.server.url,
        "--user",
        "root",
        "--password",
        "hostsim",
        "--repo",
        repo,
    )
    shown = fastpath("show", repo, r["id"])
    recorded = shown["metadata"]["vifs"]
    assert [
        (v["device"], v["network_name_label"], v["network_uuid"], v["MAC"]) for v in recorded
    ] == [
        ("0", "LAN", nets["LAN"], macs["0"]),
        ("1", "DMZ", nets["DMZ"], macs["1"]),
        ("2", "backend", nets["backend"], macs["2"]),
    ]
    # On the target, DMZ's VIF goes to DMZ2 (--network); LAN and backend are found by uuid.
    dmz2 = net(x, "DMZ2")
    out = restore_new_vm(
        pool, repo, r["id"], "router copy", extra=["--network", f"DMZ={x.network.get_uuid(dmz2)}"]
    )
    new = out["new_vm"]
    got = vifs_of(x, new["uuid"])
    assert got["0"][0] == "LAN" and got["1"][0] == "DMZ2"
    assert got["0"][1] != macs["0"] and got["1"][1] != macs["1"]  # new MACs by default
    assert got["2"][0] == "backend"
    assert new["unmapped_vifs"] == []
    # --keep-macs, and a mapping to a network that does not exist: reported, not created
    out = restore_new_vm(
        pool, repo, r["id"], "router keep", extra=["--keep-macs", "--network", "backend=nowhere"]
    )
    got = vifs_of(x, out["new_vm"]["uuid"])
    assert got == {"0": ("LAN", macs["0"]), "1": ("DMZ", macs["1"])}
    (un,) = out["new_vm"]["unmapped_vifs"]
    assert un["device"] == "2" and "no network 'nowhere'" in un["reason"]
    assert any("VIF 2" in n and "not created" in n for n in out["new_vm"]["notes"])


def test_metadata_only_and_unknown_networks(vm_with_vifs, repo_factory):
    pool, x, vm_uuid, nets, macs, refs = vm_with_vifs
    repo = repo_factory("local")
    r = fastpath(
        "backup",
        "vm",
        vm_uuid,
        "--xapi",
        pool.server.url,
        "--user",
        "root",
        "--password",
        "hostsim",
        "--repo",
        repo,
    )
    # On the target: LAN renamed (found by uuid), backend gone (reported, not created).
    x.network.set_name_label(refs["lan"], "LAN renamed")
    src_vifs = x.VM.get_VIFs(x.VM.get_by_uuid(vm_uuid))
    x.VIF.destroy(next(v for v in src_vifs if x.VIF.get_device(v) == "2"))
    x.network.destroy(refs["backend"])
    vdis_before = set(pool.api.store.all_refs("VDI"))
    out = fastpath(
        "restore",
        repo,
        r["id"],
        "--to-xapi",
        pool.server.url,
        "--user",
        "root",
        "--password",
        "hostsim",
        "--new-vm",
        "router shell",
        "--metadata-only",
    )
    assert out["disks"] == []
    assert set(pool.api.store.all_refs("VDI")) == vdis_before  # no disk restored
    ref = x.VM.get_by_uuid(out["new_vm"]["uuid"])
    assert x.VM.get_VBDs(ref) == []
    got = vifs_of(x, out["new_vm"]["uuid"])
    assert got == {"0": ("LAN renamed", got["0"][1]), "1": ("DMZ", got["1"][1])}
    (un,) = out["new_vm"]["unmapped_vifs"]
    assert un["device"] == "2" and "no network 'backend'" in un["reason"]
    assert "--network backend=NEW" in un["reason"]
    bad = fastpath(
        "restore",
        repo,
        r["id"],
        "--to-xapi",
        pool.server.url,
        "--user",
        "root",
        "--password",
        "hostsim",
        "--sr",
        pool.sr_uuid,
        "--network",
        "LAN",
        "--new-vm",
        "x",
        expect=2,
    )
    assert "OLD=NEW" in bad["_stderr"]
