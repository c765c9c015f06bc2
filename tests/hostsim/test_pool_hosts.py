"""`hostsim serve --hosts 3 --no-agent-on 2 --daemon`, judged through the XenAPI SDK: each host
has its own record, address, certificate, local SR (a PBD on that host only) and agent (own
ports, own SR roots: it cannot read another host's local SR), the shared SR has a PBD on every
host, VMs are resident on the host that sees their SR, host.call_plugin runs *that* host's
plugin (a host without it answers XENAPI_MISSING_PLUGIN as XAPI does), VM.pool_migrate and
VM.start_on follow XAPI's rule (VM_REQUIRES_SR), and `info`/`stop` keep working."""

import json
import os
import subprocess
import sys

import pytest
import XenAPI

from hostsim.certs import fingerprint


def hostsim(root, *args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "hostsim.cli", *args, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    out = hostsim(
        root,
        "serve",
        "--daemon",
        "--hosts",
        "3",
        "--no-agent-on",
        "2",
        "--vms",
        "6",
        "--disk-size",
        "4M",
        "--gc-interval",
        "0",
    )
    assert out.returncode == 0, out.stderr + open(root / "hostsim.log").read()[-3000:]
    info = json.loads((root / "hostsim.json").read_text())
    s = XenAPI.Session(info["xapi"]["url"])
    s.xenapi.login_with_password("root", "hostsim", "2.21", "pool-test")
    try:
        yield root, info, s.xenapi
    finally:
        try:
            s.xenapi.session.logout()
        finally:
            hostsim(root, "stop")


def test_hosts_srs_and_pbds(pool):
    _root, info, x = pool
    hosts = info["hosts"]
    assert [h["index"] for h in hosts] == [0, 1, 2] and hosts[0]["master"]
    assert len({h["address"] for h in hosts}) == 3
    assert x.pool.get_master(x.pool.get_all()[0]) == x.host.get_by_uuid(hosts[0]["uuid"])
    assert info["host"] == hosts[0]["uuid"] and info["sr"] == hosts[0]["sr"]
    shared = x.SR.get_by_uuid(info["shared_sr"]["uuid"])
    assert x.SR.get_shared(shared) is True
    assert sorted(x.PBD.get_host(p) for p in x.SR.get_PBDs(shared)) == sorted(
        x.host.get_by_uuid(h["uuid"]) for h in hosts
    )
    for h in hosts:
        ref = x.host.get_by_uuid(h["uuid"])
        assert x.host.get_address(ref) == h["address"]
        local = x.SR.get_by_uuid(h["sr"]["uuid"])
        assert x.SR.get_shared(local) is False
        (pbd,) = x.SR.get_PBDs(local)
        rec = x.PBD.get_record(pbd)
        assert rec["host"] == ref and rec["currently_attached"] is True
        assert sorted(x.PBD.get_SR(p) for p in x.host.get_PBDs(ref)) == sorted([local, shared])
        cert = x.host.get_server_certificate(ref)
        if h["agent"]:  # the agent serves TLS with its host's certificate
            assert h["agent"]["fingerprint"] == fingerprint(cert)
    certs = {x.host.get_server_certificate(x.host.get_by_uuid(h["uuid"])) for h in hosts}
    assert len(certs) == 3
    assert hosts[2]["agent"] is None and hosts[2]["plugin"] is False
    ports = [(h["agent_ports"]["nbd"], h["agent_ports"]["http"]) for h in hosts[:2]]
    assert ports[0] != ports[1]


def test_vms_spread_and_resident_on(pool):
    _root, info, x = pool
    hosts = info["hosts"]
    assert len(info["vms"]) == 6
    by_host = {}
    for k, vm in enumerate(info["vms"]):
        ref = x.VM.get_by_uuid(vm["uuid"])
        resident = x.VM.get_resident_on(ref)
        assert x.host.get_uuid(resident) == vm["host"] == hosts[k % 3]["uuid"]
        by_host.setdefault(resident, set()).add(ref)
        (vdi,) = vm["vdis"]
        sr = x.SR.get_uuid(x.VDI.get_SR(x.VDI.get_by_uuid(vdi)))
        assert sr == vm["sr"]
        # the first three on their host's local SR, the next three on the shared SR
        want = hosts[k]["sr"]["uuid"] if k < 3 else info["shared_sr"]["uuid"]
        assert sr == want
        assert os.path.exists(os.path.join(_sr_path(info, sr), vdi + ".vhd"))
    for host, vms in by_host.items():
        assert set(x.host.get_resident_VMs(host)) == vms


def _sr_path(info, sr_uuid):
    for sr in [h["sr"] for h in info["hosts"]] + [info["shared_sr"]]:
        if sr["uuid"] == sr_uuid:
            return sr["path"]
    raise AssertionError(sr_uuid)


def test_call_plugin_runs_on_the_host_named(pool):
    _root, info, x = pool
    hosts = info["hosts"]
    refs = [x.host.get_by_uuid(h["uuid"]) for h in hosts]
    on_host1 = info["vms"][1]["vdis"][0]  # host1's local SR
    opened = json.loads(x.host.call_plugin(refs[1], "fastpath", "open_export", {"vdi": on_host1}))
    assert opened["nbd"]["host"] == hosts[1]["address"]
    assert opened["nbd"]["port"] == hosts[1]["agent_ports"]["nbd"]
    assert opened["fingerprint"] == hosts[1]["agent"]["fingerprint"]
    x.host.call_plugin(refs[1], "fastpath", "close_export", {"ticket": opened["ticket"]})
    # the master's agent does not see host1's local SR
    with pytest.raises(XenAPI.Failure) as exc:
        x.host.call_plugin(refs[0], "fastpath", "open_export", {"vdi": on_host1})
    assert exc.value.details[0] == "FASTPATH_OPEN_FAILED"
    # a shared-SR disk opens on either host with an agent
    shared = info["vms"][3]["vdis"][0]
    for ref, h in zip(refs[:2], hosts[:2]):
        got = json.loads(x.host.call_plugin(ref, "fastpath", "open_export", {"vdi": shared}))
        assert got["nbd"]["port"] == h["agent_ports"]["nbd"]
        x.host.call_plugin(ref, "fastpath", "close_export", {"ticket": got["ticket"]})
    with pytest.raises(XenAPI.Failure) as exc:
        x.host.call_plugin(refs[2], "fastpath", "status", {})
    assert exc.value.details == ["XENAPI_MISSING_PLUGIN", "fastpath"]


def test_pool_migrate_and_start_on(pool):
    _root, info, x = pool
    refs = [x.host.get_by_uuid(h["uuid"]) for h in info["hosts"]]
    local_vm = x.VM.get_by_uuid(info["vms"][0]["uuid"])  # host0's local SR
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.pool_migrate(local_vm, refs[1], {})
    assert exc.value.details[0] == "VM_REQUIRES_SR"
    assert x.VM.get_resident_on(local_vm) == refs[0]
    shared_vm = x.VM.get_by_uuid(info["vms"][3]["uuid"])  # shared SR, on host0
    x.VM.pool_migrate(shared_vm, refs[2], {})
    assert x.VM.get_resident_on(shared_vm) == refs[2]
    assert shared_vm in x.host.get_resident_VMs(refs[2])
    assert shared_vm not in x.host.get_resident_VMs(refs[0])
    x.VM.hard_shutdown(shared_vm)
    assert x.VM.get_resident_on(shared_vm) == "OpaqueRef:NULL"
    assert shared_vm not in x.host.get_resident_VMs(refs[2])
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.pool_migrate(shared_vm, refs[1], {})
    assert exc.value.details[0] == "VM_BAD_POWER_STATE"
    x.VM.hard_shutdown(local_vm)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start_on(local_vm, refs[2], False, False)
    assert exc.value.details[0] == "VM_REQUIRES_SR"
    x.VM.start(local_vm, False, False)  # the only host that sees its SR
    assert x.VM.get_resident_on(local_vm) == refs[0]
    x.VM.start_on(shared_vm, refs[1], False, False)
    assert x.VM.get_resident_on(shared_vm) == refs[1]


def test_info_lists_hosts(pool):
    root, info, _x = pool
    out = hostsim(root, "info")
    assert out.returncode == 0
    assert [h["uuid"] for h in json.loads(out.stdout)["hosts"]] == [
        h["uuid"] for h in info["hosts"]
    ]


def test_bad_host_index_is_a_usage_error(tmp_path):
    out = hostsim(tmp_path, "serve", "--hosts", "2", "--no-agent-on", "2")
    assert out.returncode == 2 and "no such host" in out.stderr


def test_each_host_has_its_own_xapi_nbd(pool, tmp_path):
    """VDI.get_nbd_info lists one endpoint per host that has the SR attached (that host's
    address and certificate); a host's xapi-nbd serves only VDIs of its own SRs (nbdinfo, a
    client we did not write, is the judge)."""
    _root, info, x = pool
    hosts = info["hosts"]
    tmp_path_factory_dir = tmp_path
    on_host2 = x.VDI.get_by_uuid(info["vms"][1]["vdis"][0])
    (entry,) = x.VDI.get_nbd_info(on_host2)
    assert entry["address"] == hosts[1]["address"] == hosts[1]["xapi_nbd"]["host"]
    assert int(entry["port"]) == hosts[1]["xapi_nbd"]["port"]
    assert entry["cert"] == x.host.get_server_certificate(x.host.get_by_uuid(hosts[1]["uuid"]))
    shared = x.VDI.get_by_uuid(info["vms"][3]["vdis"][0])
    entries = x.VDI.get_nbd_info(shared)
    assert sorted(e["address"] for e in entries) == sorted(h["address"] for h in hosts)

    def size_over_nbd(host, cert, exportname):
        """The export's size as libnbd (a client we did not write) reads it from ``host``'s
        xapi-nbd, TLS verified against ``cert``; None when the server refuses the export."""
        import nbd

        certs = tmp_path_factory_dir / host["name"]
        certs.mkdir(exist_ok=True)
        (certs / "ca-cert.pem").write_text(cert)
        h = nbd.NBD()
        h.set_export_name(exportname)
        h.set_request_structured_replies(False)
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certs))
        h.set_tls_verify_peer(True)
        try:
            h.connect_tcp(host["address"], str(host["xapi_nbd"]["port"]))
        except nbd.Error:
            return None
        size = h.get_size()
        h.shutdown()
        return size

    name = entry["exportname"]
    assert size_over_nbd(hosts[1], entry["cert"], name) == 4 << 20
    master_cert = x.host.get_server_certificate(x.host.get_by_uuid(hosts[0]["uuid"]))
    assert size_over_nbd(hosts[0], master_cert, name) is None  # not the master: not its SR
    # the master's own local SR through its own xapi-nbd
    (mine,) = x.VDI.get_nbd_info(x.VDI.get_by_uuid(info["vms"][0]["vdis"][0]))
    assert mine["address"] == hosts[0]["address"]
    assert size_over_nbd(hosts[0], master_cert, mine["exportname"]) == 4 << 20
