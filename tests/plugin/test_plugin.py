"""The XAPI plugin, run as XAPI runs it: the executable file with the XML-RPC call as argv[1].

The answer is decoded as xapi_plugins.ml does: a methodResponse whose Status is Success (Value must be
a string) or Failure (ErrorDescription = [code, params...]); a non-zero exit is XENAPI_PLUGIN_FAILURE.
The end-to-end test starts the real agent daemon with TLS and reads the disk over NBD with the ticket
and the fingerprint the plugin handed out.
"""

import hashlib
import json
import os
import subprocess
import xmlrpc.client

import pytest

from hostsim.plugins import SHIM_DIR
from tests.fixtures.vhd import Level, pattern

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = os.path.join(ROOT, "agent", "plugin", "fastpath")
# The plugin's PYTHONPATH: hostsim's XenAPIPlugin shim, and a XenAPI module for a host whose XAPI is
# down (tests/plugin/shim/XenAPI.py).
SHIM = os.pathsep.join([SHIM_DIR, os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")])
MiB = 1 << 20
SESSION = "OpaqueRef:6f1b4f2a-0000-4000-8000-000000000001"


class XapiFailure(Exception):
    def __init__(self, description):
        Exception.__init__(self, description)
        self.code = description[0]
        self.params = description[1:]


def call_plugin(fn, args, config, inventory=None, timeout=60, shim=True):
    """host.call_plugin(host, "fastpath", fn, args) as xapi_plugins.ml executes and decodes it."""
    assert all(isinstance(v, str) for v in args.values()), "XAPI passes a Map(String, String)"
    request = xmlrpc.client.dumps((SESSION, args), fn)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": SHIM if shim else "/nonexistent",
        "FASTPATH_CONFIG": str(config),
        "FASTPATH_XENSOURCE_INVENTORY": str(inventory or "/nonexistent"),
    }
    proc = subprocess.run([PLUGIN, request], capture_output=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise XapiFailure(
            ["XENAPI_PLUGIN_FAILURE", "non-zero exit", proc.stdout.decode(), proc.stderr.decode()]
        )
    (response,), method = xmlrpc.client.loads(proc.stdout)
    if response["Status"] == "Success":
        assert isinstance(response["Value"], str), "XAPI accepts only a string result"
        return response["Value"]
    raise XapiFailure(response["ErrorDescription"])


def write_config(tmp_path, admin_socket, extra=""):
    path = tmp_path / "agent.conf"
    path.write_text("[agent]\nadmin_socket = %s\n%s" % (admin_socket, extra))
    return path


def test_plugin_file_is_an_executable_python3_script():
    assert os.access(PLUGIN, os.X_OK)
    with open(PLUGIN) as f:
        assert f.readline().strip() == "#!/usr/bin/env python3"


def test_unknown_function(tmp_path):
    with pytest.raises(XapiFailure) as ei:
        call_plugin("nope", {}, write_config(tmp_path, tmp_path / "none.sock"))
    assert ei.value.code == "UNKNOWN_XENAPI_PLUGIN_FUNCTION"


@pytest.mark.parametrize(
    "args, param",
    [
        ({}, "vdi"),
        ({"vdi": "not-a-uuid"}, "vdi"),
        ({"vdi": "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11", "base": "x"}, "base"),
        ({"vdi": "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11", "ttl": "soon"}, "ttl"),
        ({"vdi": "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11", "ttl": "0"}, "ttl"),
        ({"vdi": "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11", "transports": "ftp"}, "transports"),
    ],
)
def test_bad_arguments(tmp_path, args, param):
    with pytest.raises(XapiFailure) as ei:
        call_plugin("open_export", args, write_config(tmp_path, tmp_path / "none.sock"))
    assert ei.value.code == "FASTPATH_BAD_ARGUMENT" and ei.value.params[0] == param


def test_agent_not_running(tmp_path):
    config = write_config(tmp_path, tmp_path / "none.sock")
    with pytest.raises(XapiFailure) as ei:
        call_plugin("open_export", {"vdi": "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11"}, config)
    assert ei.value.code == "FASTPATH_AGENT_UNAVAILABLE"
    assert ei.value.params[0] == str(tmp_path / "none.sock")
    st = json.loads(call_plugin("status", {}, config))
    assert st["running"] is False and "cannot reach" in st["error"]


def der_fingerprint(cert_path):
    """SHA-256 of the certificate's DER, computed by openssl (not by the agent's code)."""
    der = subprocess.run(
        ["openssl", "x509", "-in", cert_path, "-outform", "DER"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    return hashlib.sha256(der).hexdigest()


def test_open_read_close_end_to_end(tmp_path, file_sr, agent_proc, tls_files):
    import nbd

    vdis, models = file_sr.chain([Level(4 * MiB, writes=[(MiB, pattern(7, MiB))])])
    tls_args = ["--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"]]
    agent = agent_proc([file_sr.root], tls="require", extra=tls_args)
    config = write_config(tmp_path, agent.admin_socket, "[http]\nlisten = 127.0.0.1:18843\n")

    st = json.loads(call_plugin("status", {}, config))
    assert st["running"] is True and st["pid"] == agent.pid

    out = json.loads(call_plugin("open_export", {"vdi": vdis[0], "ttl": "600"}, config))
    ticket = out["ticket"]
    assert out["vdi"] == vdis[0] and out["size"] == 4 * MiB
    assert out["tls"] == "require"
    assert out["fingerprint"] == der_fingerprint(tls_files["cert"])
    assert out["nbd"]["port"] == agent.port
    assert out["nbd"]["uri"] == "nbds://127.0.0.1:%d/%s" % (agent.port, ticket)
    # The agent reports its bound HTTP port; the plugin prefers it over the config file's.
    http_port = agent.info["http"][1]
    assert out["http"]["port"] == http_port != 18843
    assert out["http"]["url"] == "https://127.0.0.1:%d/v1/exports/%s" % (http_port, ticket)

    # The ticket works with the addresses handed out (TLS verified by libnbd against the CA).
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(tls_files["dir"])
    h.connect_uri(out["nbd"]["uri"])
    try:
        assert h.pread(4 * MiB, 0) == bytes(models[0])
    finally:
        h.shutdown()

    closed = json.loads(call_plugin("close_export", {"ticket": ticket}, config))
    assert closed == {"ticket": ticket, "revoked": True}
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(tls_files["dir"])
    with pytest.raises(nbd.Error):
        h.connect_uri(out["nbd"]["uri"])
    with pytest.raises(XapiFailure) as ei:
        call_plugin("close_export", {"ticket": "f" * 32}, config)
    assert ei.value.code == "FASTPATH_UNKNOWN_TICKET"


def test_open_export_failure_names_the_vdi(tmp_path, file_sr, agent_proc):
    agent = agent_proc([file_sr.root])
    config = write_config(tmp_path, agent.admin_socket)
    missing = "11111111-2222-4333-8444-555555555555"
    with pytest.raises(XapiFailure) as ei:
        call_plugin("open_export", {"vdi": missing}, config)
    assert ei.value.code == "FASTPATH_OPEN_FAILED" and ei.value.params[0] == missing


def test_advertised_address_and_transport_selection(tmp_path, file_sr, agent_proc):
    vdis, _ = file_sr.chain([Level(2 * MiB)])
    agent = agent_proc([file_sr.root])
    config = write_config(
        tmp_path,
        agent.admin_socket,
        "[http]\nlisten = 0.0.0.0:9443\n[plugin]\naddress = 192.0.2.10\n",
    )
    out = json.loads(call_plugin("open_export", {"vdi": vdis[0], "transports": "http"}, config))
    assert "nbd" not in out
    assert out["http"] == {
        "host": "192.0.2.10",
        "port": out["http"]["port"],
        "url": "http://192.0.2.10:%d/v1/exports/%s" % (out["http"]["port"], out["ticket"]),
    }
    assert out["fingerprint"] is None and out["tls"] == "off"


def test_without_xenapiplugin_the_builtin_dispatcher_speaks_the_same_protocol(tmp_path):
    """A dom0 python3 without xen-api's XenAPIPlugin module (XCP-ng 8.2 ships it for python2)."""
    config = write_config(tmp_path, tmp_path / "none.sock")
    with pytest.raises(XapiFailure) as ei:
        call_plugin("nope", {}, config, shim=False)
    assert ei.value.code == "UNKNOWN_XENAPI_PLUGIN_FUNCTION"
    with pytest.raises(XapiFailure) as ei:
        call_plugin("open_export", {"vdi": "x"}, config, shim=False)
    assert ei.value.code == "FASTPATH_BAD_ARGUMENT"
    with pytest.raises(XapiFailure) as ei:
        call_plugin(
            "open_export", {"vdi": "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11"}, config, shim=False
        )
    assert ei.value.code == "FASTPATH_AGENT_UNAVAILABLE"
    assert json.loads(call_plugin("status", {}, config, shim=False))["running"] is False


def test_open_then_read_over_https_pinned_by_fingerprint(tmp_path, file_sr, agent_proc, tls_files):
    """The orchestrator's HTTP path end to end: plugin -> ticket -> HTTPS with the pinned certificate."""
    import hashlib as _hashlib
    import socket
    import ssl

    from agent.http import protocol as hp

    vdis, models = file_sr.chain([Level(4 * MiB, writes=[(MiB, pattern(8, 2 * MiB))])])
    tls_args = ["--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"]]
    agent = agent_proc(
        [file_sr.root], tls="require", extra=tls_args + ["--http-listen", "127.0.0.1:0"]
    )
    config = write_config(tmp_path, agent.admin_socket)
    out = json.loads(call_plugin("open_export", {"vdi": vdis[0], "transports": "http"}, config))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust comes from the pinned fingerprint below
    raw = socket.create_connection((out["http"]["host"], out["http"]["port"]), timeout=30)
    s = ctx.wrap_socket(raw)
    try:
        der = s.getpeercert(binary_form=True)
        assert _hashlib.sha256(der).hexdigest() == out["fingerprint"]
        path = out["http"]["url"].split("/", 3)[3]
        s.sendall(
            ("GET /%s/blocks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path).encode()
        )
        buf = b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    dec = hp.BlocksDecoder()
    image = bytearray(4 * MiB)
    for ev in dec.feed(body):
        if ev[0] == "block":
            image[ev[1] * 2 * MiB : ev[1] * 2 * MiB + len(ev[3])] = ev[3]
    dec.finish()
    assert bytes(image) == bytes(models[0])


def test_incremental_ticket_and_close_argument_checks(tmp_path, file_sr, agent_proc):
    vdis, _ = file_sr.chain(
        [
            Level(4 * MiB, writes=[(0, pattern(1, MiB))]),
            Level(4 * MiB, writes=[(2 * MiB, pattern(2, MiB))]),
        ]
    )
    agent = agent_proc([file_sr.root])
    config = write_config(tmp_path, agent.admin_socket)
    out = json.loads(
        call_plugin("open_export", {"vdi": vdis[1], "base": vdis[0], "sr": file_sr.sr}, config)
    )
    assert out["base"] == vdis[0] and out["sr"] == file_sr.sr
    listed = agent.admin(op="list_tickets")["tickets"]
    assert [(t["id"], t["base"]) for t in listed] == [(out["ticket"], vdis[0])]
    st = json.loads(call_plugin("status", {}, config))
    assert st["running"] is True and st["stats"]["tickets"] == 1
    for bad in ("", "../../x", "a b"):
        with pytest.raises(XapiFailure) as ei:
            call_plugin("close_export", {"ticket": bad}, config)
        assert ei.value.code == "FASTPATH_BAD_ARGUMENT"
    # A base that is not an ancestor of the VDI: the agent refuses, the plugin says so.
    with pytest.raises(XapiFailure) as ei:
        call_plugin("open_export", {"vdi": vdis[0], "base": vdis[1]}, config)
    assert ei.value.code == "FASTPATH_OPEN_FAILED" and ei.value.params[0] == vdis[0]


def test_hostsim_plugin_runner_drives_the_same_file(tmp_path, file_sr, agent_proc):
    """hostsim's host.call_plugin (its own XenAPIPlugin stand-in) runs this plugin unchanged."""
    from hostsim import plugins

    vdis, _ = file_sr.chain([Level(2 * MiB)])
    agent = agent_proc([file_sr.root])
    config = write_config(tmp_path, agent.admin_socket)
    runner = plugins.PluginRunner(
        [os.path.dirname(PLUGIN)], None, env={"FASTPATH_CONFIG": str(config)}, timeout=60
    )
    out = json.loads(runner.call(SESSION, "fastpath", "open_export", {"vdi": vdis[0]}))
    assert out["vdi"] == vdis[0] and out["http"]["port"] == agent.info["http"][1]
    assert json.loads(runner.call(SESSION, "fastpath", "status", {}))["running"] is True
