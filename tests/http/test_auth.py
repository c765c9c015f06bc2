"""Who may read: tickets in the path or as a Bearer token, and every way a ticket is refused; TLS."""

import json
import socket
import ssl

import pytest

from agent.http.limits import Limits
from tests.http.conftest import (
    BASE_VDI,
    VDI,
    fd_count,
    make_tls,
    read_response,
    request,
    wait_for,
)


def err(resp):
    status, headers, body = resp
    return status, json.loads(body)["error"]


def test_no_ticket_is_401_with_a_bearer_challenge(env):
    status, headers, body = request(env, "/v1/exports/-/raw")
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"] == "unauthorized"
    assert request(env, "/v1/exports/")[0] in (401, 404)
    assert err(request(env, "/v1/exports/-/raw", [("Authorization", "Basic abc")])) == (
        401,
        "unauthorized",
    )


def test_bearer_ticket_and_mismatch(env, disk):
    t = env.ticket()
    status, _, body = request(env, "/v1/exports/-/raw", [("Authorization", "Bearer %s" % t)])
    assert status == 200 and body == disk.model
    other = env.ticket()
    assert err(
        request(env, "/v1/exports/%s/raw" % t, [("Authorization", "Bearer %s" % other)])
    ) == (400, "ticket_mismatch")


@pytest.mark.parametrize(
    "ticket, expected",
    [
        ("0" * 32, (403, "invalid_ticket")),
        ("short", (403, "invalid_ticket")),
        ("%2e%2e", (403, "invalid_ticket")),
        ("a" * 200, (403, "invalid_ticket")),
        ("abc%20def0123", (403, "invalid_ticket")),
        ("..%2F..%2Fetc%2Fpasswd", (404, "not_found")),
        ("../../etc/passwd", (404, "not_found")),
    ],
)
def test_wrong_or_malformed_ticket_is_refused(env, ticket, expected):
    assert err(request(env, "/v1/exports/%s/raw" % ticket)) == expected


def test_expired_and_revoked_tickets_are_410(env):
    t = env.ticket(ttl=30)
    assert request(env, "/v1/exports/%s" % t)[0] == 200
    env.clock.offset = 31
    assert err(request(env, "/v1/exports/%s" % t)) == (410, "ticket_expired")
    env.clock.offset = 0
    t2 = env.ticket()
    env.tickets.revoke(t2)
    assert err(request(env, "/v1/exports/%s/vhd" % t2)) == (410, "ticket_revoked")


def test_ticket_for_another_vdi_is_403(env):
    t = env.ticket()
    assert request(env, "/v1/exports/%s?vdi=%s" % (t, VDI))[0] == 200
    assert err(request(env, "/v1/exports/%s/raw?vdi=%s" % (t, BASE_VDI))) == (403, "wrong_vdi")


def test_ticket_connection_limit_is_503(env):
    t = env.ticket(max_connections=1)
    env.tickets.acquire(t)  # another client holds the only slot
    status, headers, body = request(env, "/v1/exports/%s" % t)
    assert status == 503 and headers["retry-after"] == "1"
    env.tickets.release(t)
    assert request(env, "/v1/exports/%s" % t)[0] == 200
    wait_for(lambda: env.tickets.get(t).connections == 0)


def test_errors_never_leak_a_traceback(env):
    # A VDI that vanished from the SR after the ticket was made: a clean JSON 404.
    t = env.ticket(vdi="11111111-2222-4333-8444-555555555555")
    status, headers, body = request(env, "/v1/exports/%s/raw" % t)
    assert status == 404
    doc = json.loads(body)
    assert set(doc) == {"error", "message"} and doc["error"] == "vdi_not_found"
    assert "Traceback" not in body.decode()


def tls_get(env, client_ctx, path):
    raw = socket.create_connection((env.host, env.port), timeout=10)
    s = client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())
        return read_response(s)
    finally:
        s.close()


def test_tls_required_refuses_plaintext_and_serves_tls(make_server, tmp_path, disk):
    server_ctx, client_ctx, _ = make_tls(tmp_path)
    env = make_server(tls_context=server_ctx, tls_mode="require")
    before = fd_count()
    t = env.ticket()
    status, headers, body = request(env, "/v1/exports/%s/raw" % t)
    assert status == 400 and json.loads(body)["error"] == "tls_required"
    status, headers, body = tls_get(env, client_ctx, "/v1/exports/%s/raw" % t)
    assert status == 200 and body == disk.model
    # Under TLS whole blocks are pread, not sendfile'd.
    assert env.server.metrics.bytes_sent["raw"] >= len(disk.model)
    assert env.counters.snapshot()["sendfile_bytes"] == 0
    assert env.counters.snapshot()["pread_bytes"] > 0
    status, _, body = tls_get(env, client_ctx, "/v1/exports/%s/blocks" % t)
    assert status == 200
    assert env.server.metrics.blocks["pread"] == 2 and env.server.metrics.blocks["sendfile"] == 0
    wait_for(lambda: env.server.metrics.connections_open == 0)
    assert fd_count() == before


def test_tls_streams_are_the_plaintext_bytes(make_server, tmp_path, disk):
    """Every stream over TLS (pread + SSL writes) is byte for byte the plaintext one (sendfile,
    TCP_CORK), on one server that serves both."""
    server_ctx, client_ctx, _ = make_tls(tmp_path)
    env = make_server(tls_context=server_ctx, tls_mode="optional")
    t = env.ticket()
    for stream in ("blocks", "vhd", "raw", "blocks?start=1&count=1"):
        status, _, clear = request(env, "/v1/exports/%s/%s" % (t, stream))
        assert status == 200 and clear
        status, _, tls = tls_get(env, client_ctx, "/v1/exports/%s/%s" % (t, stream))
        assert status == 200 and tls == clear, stream
    assert env.server.metrics.blocks["pread"] == env.server.metrics.blocks["sendfile"] > 0


def test_tls_optional_serves_both(make_server, tmp_path, disk):
    server_ctx, client_ctx, _ = make_tls(tmp_path)
    env = make_server(tls_context=server_ctx, tls_mode="optional")
    t = env.ticket()
    assert request(env, "/v1/exports/%s" % t)[0] == 200
    assert tls_get(env, client_ctx, "/v1/exports/%s" % t)[0] == 200


def test_tls_client_with_wrong_pin_fails_handshake(make_server, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    server_ctx, good_client, _ = make_tls(tmp_path / "a")
    _, other_client, _ = make_tls(tmp_path / "b")
    env = make_server(tls_context=server_ctx, tls_mode="require")
    with pytest.raises(ssl.SSLError):
        tls_get(env, other_client, "/healthz")
    # ... and the server still serves a client that trusts its certificate.
    assert tls_get(env, good_client, "/healthz")[0] == 200


def test_tickets_never_reach_the_log(env, caplog):
    import logging
    import socket

    caplog.set_level(logging.INFO, logger="fastpath.http")
    t = env.ticket()
    request(env, "/v1/exports/%s/raw" % t, [("Range", "bytes=0-9")])
    request(env, "/v1/exports/%s/nope" % t)
    s = env.connect()
    s.sendall(("GET /v1/exports/%s/raw HTTP/1.1\r\nHost: x\r\n\r\n" % t).encode())
    s.recv(10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    wait_for(lambda: env.server.metrics.connections_open == 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("/v1/exports/" in m for m in messages)
    assert not any(t in m for m in messages)


def test_stop_closes_idle_tls_connections(make_server, tmp_path):
    server_ctx, client_ctx, _ = make_tls(tmp_path)
    env = make_server(tls_context=server_ctx, tls_mode="require", limits=Limits(idle_timeout=600))
    raw = socket.create_connection((env.host, env.port), timeout=30)
    s = client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == 200  # keep-alive: the server now waits for the next request
        env.server.stop()
        assert env.server.metrics.connections_open == 0
        assert s.recv(100) == b""
    finally:
        s.close()


def test_client_certificates_when_the_agent_requires_them(make_server, tls_files):
    """[tls] client_ca: the HTTP port, like NBD, only serves clients with a certificate of that CA."""
    import os

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls_files["cert"], tls_files["key"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=tls_files["ca"])
    env = make_server(tls_context=server_ctx, tls_mode="require")
    anonymous = ssl.create_default_context(cafile=tls_files["ca"])
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError)):
        tls_get(env, anonymous, "/healthz")
    with_cert = ssl.create_default_context(cafile=tls_files["ca"])
    cdir = tls_files["client_dir"]
    with_cert.load_cert_chain(
        os.path.join(cdir, "client-cert.pem"), os.path.join(cdir, "client-key.pem")
    )
    assert tls_get(env, with_cert, "/healthz")[0] == 200


def test_ipv6_listener(disk):
    from agent.http.server import HttpServer
    from agent.tickets import TicketStore

    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip("no IPv6 loopback on this machine: %s" % exc)
    server = HttpServer("[::1]:0", TicketStore(), lambda t: None).start()
    try:
        s = socket.create_connection(("::1", server.address[1]), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")  # HTTP/1.0: no Host needed, closed after
        status, headers, body = read_response(s)
        assert status == 200 and headers["connection"] == "close"
        assert s.recv(10) == b""
        s.close()
    finally:
        server.stop()
