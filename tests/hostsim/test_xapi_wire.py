"""hostsim's XAPI over XML-RPC, driven by the unmodified XenAPI SDK (and raw xmlrpc.client for the wire)."""

import os
import stat
import threading
import xmlrpc.client

import pytest
import XenAPI

from hostsim.api import Xapi
from hostsim.server import XapiHTTPServer

MiB = 1 << 20


def raw_call(url, method, *params):
    """The response dict as XAPI sends it (no SDK interpretation)."""
    proxy = xmlrpc.client.ServerProxy(url, allow_none=True)
    return getattr(proxy, method)(*params)


def test_login_and_status_envelopes(hostsim_pool):
    url = hostsim_pool.server.url
    ok = raw_call(url, "session.login_with_password", "root", "hostsim", "2.21", "t")
    assert ok["Status"] == "Success" and ok["Value"].startswith("OpaqueRef:")
    bad = raw_call(url, "session.login_with_password", "root", "nope", "2.21", "t")
    assert bad == {
        "Status": "Failure",
        "ErrorDescription": ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"],
    }
    invalid = raw_call(url, "VM.get_all", "OpaqueRef:not-a-session")
    assert invalid["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:not-a-session"]
    out = raw_call(url, "session.logout", ok["Value"])
    assert out["Status"] == "Success"
    after = raw_call(url, "VM.get_all", ok["Value"])
    assert after["ErrorDescription"][0] == "SESSION_INVALID"


def test_sdk_login_failure_raises(hostsim_pool):
    s = XenAPI.Session(hostsim_pool.server.url)
    with pytest.raises(XenAPI.Failure) as err:
        s.xenapi.login_with_password("root", "wrong", "2.21", "t")
    assert err.value.details[0] == "SESSION_AUTHENTICATION_FAILED"


def test_records_and_getters(hostsim_pool, xapi_session):
    x = xapi_session.xenapi
    vm = hostsim_pool.create_vm("alpha", [4 * MiB])
    recs = x.VM.get_all_records()
    assert list(recs) == [vm]
    rec = x.VM.get_record(vm)
    assert rec["name_label"] == "alpha" and rec["power_state"] == "Halted"
    assert rec["is_a_snapshot"] is False and rec["snapshot_of"] == "OpaqueRef:NULL"
    assert x.VM.get_by_uuid(rec["uuid"]) == vm
    assert x.VM.get_name_label(vm) == "alpha"
    assert x.VM.get_by_name_label("alpha") == [vm]
    vdi = x.VBD.get_VDI(rec["VBDs"][0])
    vrec = x.VDI.get_record(vdi)
    # int64 fields travel as strings, as XAPI sends them
    assert vrec["virtual_size"] == str(4 * MiB)
    assert int(vrec["physical_utilisation"]) > 0
    assert vrec["cbt_enabled"] is False and vrec["sm_config"] == {}
    assert vrec["SR"] == hostsim_pool.sr_ref
    pool = x.pool.get_all()[0]
    master = x.pool.get_master(pool)
    assert x.host.get_API_version_major(master) == "2"
    x.VM.set_name_label(vm, "beta")
    x.VM.add_to_other_config(vm, "k", "v")
    assert x.VM.get_other_config(vm) == {"k": "v"}
    x.VM.remove_from_other_config(vm, "k")
    assert x.VM.get_record(vm)["other_config"] == {}
    assert x.VM.get_name_label(vm) == "beta"


@pytest.mark.parametrize(
    "call, expected",
    [
        (
            lambda x: x.VM.get_record("OpaqueRef:missing"),
            ["HANDLE_INVALID", "VM", "OpaqueRef:missing"],
        ),
        (lambda x: x.VDI.get_by_uuid("nope"), ["UUID_INVALID", "VDI", "nope"]),
        (
            lambda x: x.VM.get_record(),
            ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "2", "1"],
        ),
        (lambda x: x.VM.frobnicate("a"), ["MESSAGE_METHOD_UNKNOWN", "VM.frobnicate"]),
        (lambda x: x.Nothing.get_all(), ["MESSAGE_METHOD_UNKNOWN", "Nothing.get_all"]),
        (
            lambda x: x.event_from(["vm"], "garbage", 0.0),
            ["EVENT_FROM_TOKEN_PARSE_FAILURE", "garbage"],
        ),
    ],
)
def test_error_codes(xapi_session, call, expected):
    with pytest.raises(XenAPI.Failure) as err:
        call(xapi_session.xenapi)
    assert err.value.details == expected


def test_async_task_success_and_failure(hostsim_pool, xapi_session):
    x = xapi_session.xenapi
    vm = hostsim_pool.create_vm("alpha", [4 * MiB])
    task = x.Async.VM.snapshot(vm, "snap")
    assert task.startswith("OpaqueRef:")
    token = ""
    # Wait through event.from, the way clients are meant to.
    while x.task.get_status(task) == "pending":
        token = x.event_from(["task"], token, 30.0)["token"]
    rec = x.task.get_record(task)
    assert rec["status"] == "success"
    assert rec["result"].startswith("<value>OpaqueRef:") and rec["result"].endswith("</value>")
    snap = rec["result"][len("<value>") : -len("</value>")]
    assert x.VM.get_is_a_snapshot(snap) is True
    assert x.VM.get_snapshot_of(snap) == vm
    assert x.VM.get_snapshots(vm) == [snap]
    bad = x.Async.VM.destroy("OpaqueRef:gone")
    while x.task.get_status(bad) == "pending":
        token = x.event_from(["task"], token, 30.0)["token"]
    assert x.task.get_error_info(bad) == ["HANDLE_INVALID", "VM", "OpaqueRef:gone"]
    x.task.destroy(bad)
    with pytest.raises(XenAPI.Failure):
        x.task.get_record(bad)


def test_event_from_shape_classes_and_tokens(hostsim_pool, xapi_session):
    x = xapi_session.xenapi
    vm = hostsim_pool.create_vm("alpha", [4 * MiB])
    first = x.event_from(["vm"], "", 0.0)
    assert set(first) == {"events", "valid_ref_counts", "token"}
    assert [(e["class"], e["operation"], e["ref"]) for e in first["events"]] == [("vm", "add", vm)]
    ev = first["events"][0]
    assert set(ev) == {"id", "timestamp", "class", "operation", "ref", "snapshot"}
    assert ev["snapshot"]["name_label"] == "alpha"
    assert first["valid_ref_counts"]["vm"] == 1 and first["valid_ref_counts"]["vdi"] == 1
    token = first["token"]
    # Nothing new: times out with no events and a usable token.
    quiet = x.event_from(["vm"], token, 0.2)
    assert quiet["events"] == []
    # A change in another class is not reported to a "vm" subscriber.
    x.VDI.set_name_label(hostsim_pool.vm_vdis(vm)[0], "renamed")
    assert x.event_from(["vm"], token, 0.2)["events"] == []
    got = x.event_from(["vdi"], token, 0.2)["events"]
    assert [(e["class"], e["operation"]) for e in got] == [("vdi", "mod")]
    everything = x.event_from(["*"], "", 0.0)["events"]
    assert {e["class"] for e in everything} >= {"pool", "host", "sr", "pbd", "vdi", "vbd", "vm"}
    # del events carry no snapshot
    x.VM.set_name_label(vm, "x")
    token = x.event_from(["vm"], token, 0.0)["token"]
    x.VM.destroy(vm)
    gone = x.event_from(["vm"], token, 0.0)["events"]
    assert [(e["operation"], e["ref"]) for e in gone] == [("del", vm)]
    assert "snapshot" not in gone[0]


def test_event_from_blocks_until_a_change(hostsim_pool, xapi_session):
    x = xapi_session.xenapi
    vm = hostsim_pool.create_vm("alpha", [])
    token = x.event_from(["vm"], "", 0.0)["token"]
    started = threading.Event()

    def change():
        started.wait(10)
        hostsim_pool.api.store.update("VM", vm, name_label="changed")

    t = threading.Thread(target=change)
    t.start()
    started.set()
    out = x.event_from(["vm"], token, 60.0)  # returns on the change, long before the timeout
    t.join()
    assert [(e["operation"], e["snapshot"]["name_label"]) for e in out["events"]] == [
        ("mod", "changed")
    ]


def test_logout_wakes_a_blocked_event_from(hostsim_pool):
    url = hostsim_pool.server.url
    ref = raw_call(url, "session.login_with_password", "root", "hostsim", "2.21", "t")["Value"]
    result = {}

    def blocked():
        result["r"] = raw_call(
            url, "event.from", ref, ["vm"], "00000000000000099999,00000000000000000000", 120.0
        )

    t = threading.Thread(target=blocked)
    t.start()
    # Wait until the call is registered server-side, then log the session out.
    other = raw_call(url, "session.login_with_password", "root", "hostsim", "2.21", "t")["Value"]
    hostsim_pool.api.invalidate_session(ref)
    t.join(60)
    assert not t.is_alive()
    assert result["r"]["ErrorDescription"][0] == "SESSION_INVALID"
    raw_call(url, "session.logout", other)


def test_call_plugin_runs_the_plugin_file_with_a_xenapiplugin_shim(
    hostsim_pool, xapi_session, tmp_path
):
    plugdir = tmp_path / "plugins"
    plugdir.mkdir()
    plugin = plugdir / "echo"
    plugin.write_text(
        "import XenAPIPlugin\n"
        "def echo(session, args):\n"
        "    pool = session.xenapi.pool.get_all()[0]\n"
        "    return '%s|%s|%s' % (args['a'], len(args), pool.startswith('OpaqueRef:'))\n"
        "def boom(session, args):\n"
        "    raise XenAPIPlugin.Failure('BOOM', ['x'])\n"
        "def crash(session, args):\n"
        "    raise ValueError('bad')\n"
        "if __name__ == '__main__':\n"
        "    XenAPIPlugin.dispatch({'echo': echo, 'boom': boom, 'crash': crash})\n"
    )
    os.chmod(plugin, os.stat(plugin).st_mode | stat.S_IXUSR)
    hostsim_pool.api.plugins.plugin_dirs.insert(0, str(plugdir))
    x = xapi_session.xenapi
    host = x.host.get_all()[0]
    assert x.host.call_plugin(host, "echo", "echo", {"a": "hi", "b": "2"}) == "hi|2|True"
    with pytest.raises(XenAPI.Failure) as err:
        x.host.call_plugin(host, "echo", "boom", {})
    assert err.value.details == ["BOOM", "x"]
    with pytest.raises(XenAPI.Failure) as err:
        x.host.call_plugin(host, "echo", "crash", {})
    assert err.value.details == ["XENAPI_PLUGIN_FAILURE", "crash", "ValueError", "bad"]
    with pytest.raises(XenAPI.Failure) as err:
        x.host.call_plugin(host, "echo", "nope", {})
    assert err.value.details == ["UNKNOWN_XENAPI_PLUGIN_FUNCTION", "nope"]
    with pytest.raises(XenAPI.Failure) as err:
        x.host.call_plugin(host, "missing", "f", {})
    assert err.value.details == ["XENAPI_MISSING_PLUGIN", "missing"]


def test_slave_refuses_login_with_host_is_slave():
    slave = Xapi()
    slave.master_address = "192.0.2.1"
    server = XapiHTTPServer(("127.0.0.1", 0), slave).start()
    try:
        s = XenAPI.Session(server.url)
        with pytest.raises(XenAPI.Failure) as err:
            s.xenapi.login_with_password("root", "hostsim", "2.21", "t")
        assert err.value.details == ["HOST_IS_SLAVE", "192.0.2.1"]
    finally:
        server.stop()


def test_hostile_requests(hostsim_pool, xapi_session):
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(hostsim_pool.server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", "/", body=b"<not-xml", headers={"Content-Type": "text/xml"})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200 and b"<fault>" in body
    conn.request("POST", "/", body=b"x", headers={"Content-Length": str(1 << 30)})
    assert conn.getresponse().status == 413
    conn.close()
    x = xapi_session.xenapi
    with pytest.raises(XenAPI.Failure) as err:
        x.event_from("vm", "", 0.0)
    assert err.value.details == ["FIELD_TYPE_ERROR", "classes"]
    with pytest.raises(XenAPI.Failure) as err:
        x.event_from(["vm"], "", "soon")
    assert err.value.details == ["FIELD_TYPE_ERROR", "timeout"]
    # unknown classes are ignored, as XAPI does
    assert x.event_from(["nosuchclass"], "", 0.0)["events"] == []
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.create({"SR": hostsim_pool.sr_ref, "virtual_size": "lots"})
    assert err.value.details == ["FIELD_TYPE_ERROR", "virtual_size"]
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.create({"SR": hostsim_pool.sr_ref, "virtual_size": "0"})
    assert err.value.details[0] == "SR_BACKEND_FAILURE_79"
    with pytest.raises(XenAPI.Failure) as err:
        x.Async.VM.nothing("a")
    assert err.value.details[0] == "MESSAGE_METHOD_UNKNOWN"
    with pytest.raises(XenAPI.Failure) as err:
        x.host.call_plugin(x.host.get_all()[0], "../etc/passwd", "f", {})
    assert err.value.details[0] == "XENAPI_MISSING_PLUGIN"
    with pytest.raises(XenAPI.Failure) as err:
        x.host.call_plugin(x.host.get_all()[0], "p", "f", {"a": 1})
    assert err.value.details == ["FIELD_TYPE_ERROR", "args"]


def test_snapshot_of_a_template_clone_chain_and_vm_destroy_rules(hostsim_pool, xapi_session):
    x = xapi_session.xenapi
    vm = hostsim_pool.create_vm("alpha", [MiB], running=True)
    with pytest.raises(XenAPI.Failure) as err:
        x.VM.clone(vm, "c")
    assert err.value.details[0] == "VM_BAD_POWER_STATE"
    with pytest.raises(XenAPI.Failure) as err:
        x.VM.destroy(vm)
    assert err.value.details == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.destroy(vdi)
    assert err.value.details == ["VDI_IN_USE", vdi, "destroy"]
    snap = x.VM.snapshot(vm, "s")
    with pytest.raises(XenAPI.Failure) as err:
        x.VM.snapshot(snap, "s2")
    assert err.value.details[0] == "OPERATION_NOT_ALLOWED"
    x.VM.clean_shutdown(vm)
    x.VM.destroy(vm)
    assert x.VM.get_snapshot_of(snap) == "OpaqueRef:NULL"
    # the base copy cannot be destroyed while it has children
    base = x.VDI.get_by_uuid(x.VDI.get_sm_config(vdi)["vhd-parent"])
    with pytest.raises(XenAPI.Failure) as err:
        x.VDI.destroy(base)
    assert err.value.details[0] == "SR_BACKEND_FAILURE_24"
