"""Tickets, the admin socket, configuration and the serve/ticket command line."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from agent import config as config_mod
from agent import tickets as t
from tests.fixtures.nbd import ROOT


class Clock(object):
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_ticket_ids_are_128_bit_hex_and_unique():
    store = t.TicketStore()
    ids = {store.create("v").id for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_expiry_revocation_and_listeners():
    clock = Clock()
    store = t.TicketStore(clock=clock)
    gone = []
    store.add_listener(lambda tk: gone.append(tk.id))
    a = store.create("v1", ttl=10)
    b = store.create("v2", ttl=100)
    assert store.get(a.id) is a
    clock.now += 11
    with pytest.raises(t.TicketError, match="expired"):
        store.get(a.id)
    assert store.expire() == [a] and gone == [a.id]
    assert store.expire() == []  # notified once
    store.revoke(b.id)
    assert gone == [a.id, b.id]
    with pytest.raises(t.TicketError, match="revoked"):
        store.acquire(b.id)
    with pytest.raises(t.TicketError, match="unknown"):
        store.get("0" * 32)
    clock.now += 10000
    store.expire()
    assert store.list() == []  # dead tickets are forgotten eventually


def test_max_connections():
    store = t.TicketStore()
    tk = store.create("v", max_connections=2)
    store.acquire(tk.id)
    store.acquire(tk.id)
    with pytest.raises(t.TicketError, match="connections"):
        store.acquire(tk.id)
    store.release(tk.id)
    store.acquire(tk.id)


@pytest.mark.parametrize("kw", [{"ttl": 0}, {"ttl": -1}, {"ttl": 10**9}, {"max_connections": 0}])
def test_bad_ticket_parameters(kw):
    with pytest.raises(ValueError):
        t.TicketStore().create("v", **kw)


def _admin_server(tmp_path, handler=None, allowed=None):
    path = str(tmp_path / "run" / "agent.sock")

    def default(req):
        if req["op"] == "boom":
            raise ValueError("boom")
        return {"echo": req}

    return t.AdminServer(path, handler or default, allowed_uids=allowed).start()


def test_admin_socket_mode_and_round_trip(tmp_path):
    srv = _admin_server(tmp_path)
    try:
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
        resp = t.admin_call(srv.path, {"op": "ping", "x": 1})
        assert resp == {"ok": True, "echo": {"op": "ping", "x": 1}}
        assert t.admin_call(srv.path, {"op": "boom"}) == {"ok": False, "error": "ValueError: boom"}
        # malformed lines get one-line errors, the connection keeps working
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(srv.path)
        s.sendall(b"not json\n[1]\n" + json.dumps({"op": "ping"}).encode() + b"\n")
        buf = b""
        while buf.count(b"\n") < 3:
            buf += s.recv(4096)
        lines = [json.loads(x) for x in buf.splitlines()]
        assert [x["ok"] for x in lines] == [False, False, True]
        s.close()
        # a second server refuses to take over a live socket
        with pytest.raises(OSError, match="in use"):
            t.AdminServer(srv.path, lambda r: {}).start()
    finally:
        srv.stop()
    assert not os.path.exists(srv.path)


def test_admin_refuses_other_uids(tmp_path):
    """SO_PEERCRED: a peer whose uid is not allowed gets one refusal line and is closed. We cannot
    switch uid here, so we allow only a uid that is not ours."""
    srv = _admin_server(tmp_path, allowed={os.getuid() + 4242})
    try:
        resp = t.admin_call(srv.path, {"op": "ping"})
        assert resp["ok"] is False and "permission denied" in resp["error"]
    finally:
        srv.stop()


def test_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    sock_path = str(path / "agent.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    s.close()  # leaves a dead socket file behind
    srv = t.AdminServer(sock_path, lambda r: {}).start()
    try:
        assert t.admin_call(sock_path, {"op": "ping"})["ok"]
    finally:
        srv.stop()


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_are_xcp_ng():
    cfg = config_mod.load()
    assert cfg.sr_roots == ["/var/run/sr-mount"]
    assert cfg.nbd_listen == ("0.0.0.0", 10810)
    assert cfg.http_listen == ("0.0.0.0", 8843)
    assert cfg.tls_mode == "require"
    assert cfg.admin_socket == "/run/fastpath/agent.sock"


def test_config_file_and_overrides(tmp_path):
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[agent]\nsr_roots = /a, /b\n  /c\nadmin_socket = /tmp/x.sock\n"
        "[nbd]\nlisten = [::1]:10900\nidle_timeout = 5\nlist_exports = yes\n"
        "[http]\nlisten = :9000\n"
        "[tls]\nmode = optional ; comment\ncert = /c.pem\nkey =\nclient_ca = /ca.pem\n"
    )
    cfg = config_mod.load(str(ini))
    assert cfg.sr_roots == ["/a", "/b", "/c"]
    assert cfg.nbd_listen == ("::1", 10900)
    assert cfg.http_listen == ("0.0.0.0", 9000)
    assert cfg.idle_timeout == 5.0 and cfg.list_exports is True
    assert (cfg.tls_mode, cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) == (
        "optional",
        "/c.pem",
        None,
        "/ca.pem",
    )
    cfg = config_mod.load(str(ini), tls_mode="off", sr_roots=["/z"], nbd_listen=None)
    assert cfg.tls_mode == "off" and cfg.sr_roots == ["/z"] and cfg.nbd_listen == ("::1", 10900)


@pytest.mark.parametrize(
    "text",
    [
        "[nbd]\nlisten = nonsense\n",
        "[nbd]\nlisten = h:99999\n",
        "[tls]\nmode = maybe\n",
        "[nbd]\nworkers = x\n",
        "garbage",
    ],
)
def test_bad_config(tmp_path, text):
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    with pytest.raises(config_mod.ConfigError):
        config_mod.load(str(ini))


def _cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "agent.daemon"] + list(args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_usage_errors_exit_2(tmp_path):
    assert _cli("serve", "--tls", "maybe").returncode == 2
    assert _cli("ticket").returncode == 2
    bad = tmp_path / "bad.ini"
    bad.write_text("[tls]\nmode = nope\n")
    r = _cli("serve", "--config", str(bad))
    assert r.returncode == 2 and "tls mode" in r.stderr


def test_cli_tls_without_certificate_fails_cleanly(tmp_path):
    r = _cli(
        "serve",
        "--tls",
        "require",
        "--tls-cert",
        str(tmp_path / "missing.pem"),
        "--nbd-listen",
        "127.0.0.1:0",
        "--admin-socket",
        str(tmp_path / "a.sock"),
    )
    assert r.returncode == 1 and "cannot start" in r.stderr


def test_cli_ticket_commands(file_sr, agent_proc):
    agent = agent_proc([file_sr.root])
    vdi = file_sr.qemu_vdi(1 << 20)
    r = _cli(
        "ticket",
        "create",
        "--vdi",
        vdi,
        "--ttl",
        "60",
        "--admin-socket",
        agent.admin_socket,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    tid = created["export_name"]
    assert created["ticket"]["vdi"] == vdi and created["nbd"]["port"] == agent.port
    r = _cli("ticket", "list", "--admin-socket", agent.admin_socket, "--json")
    assert [x["id"] for x in json.loads(r.stdout)] == [tid]
    r = _cli("ticket", "revoke", tid, "--admin-socket", agent.admin_socket)
    assert r.returncode == 0 and tid in r.stdout
    r = _cli("ticket", "create", "--vdi", "not-a-uuid", "--admin-socket", agent.admin_socket)
    assert r.returncode == 1 and "uuid" in r.stderr
    r = _cli(
        "ticket",
        "create",
        "--vdi",
        "aaaaaaaa-0000-0000-0000-000000000001",
        "--admin-socket",
        agent.admin_socket,
    )
    assert r.returncode == 1 and "not found" in r.stderr
    r = _cli("ticket", "list", "--admin-socket", str(agent.admin_socket) + ".nope")
    assert r.returncode == 1 and "cannot reach" in r.stderr
