"""Hostile and careless clients: none of them stops the service, and nothing leaks.

Each case ends by checking that a well-behaved client is still served; the last one checks that
the process holds no more file descriptors than before (connections, exports and chain files closed).
"""

import json
import socket
import struct

import pytest

from agent.http import protocol as hp
from agent.http.limits import Limits
from tests.http.conftest import SIZE, fd_count, read_response, request, wait_for


def healthy(env):
    status, _, body = request(env, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def raw_exchange(env, data, timeout=10):
    """Send bytes, read until the server closes; returns everything received."""
    s = env.connect(timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def status_of(resp):
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else None


@pytest.fixture
def fast_env(make_server):
    limits = Limits(
        header_timeout=0.5,
        idle_timeout=1.0,
        send_timeout=5.0,
        max_connections=6,
        max_request_line=1024,
        max_header_bytes=4096,
        max_headers=20,
    )
    return make_server(limits=limits)


@pytest.mark.parametrize(
    "data, status",
    [
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 8000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: 1\r\n" * 50 + b"\r\n", 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
        (b"\x00\xff\xfe garbage \r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, 413),
        (b"GET /v1/exports/%s HTTP/3.0\r\n\r\n", 505),
    ],
)
def test_malformed_requests_get_an_error_and_a_close(fast_env, data, status):
    resp = raw_exchange(fast_env, data)
    assert status_of(resp) == status
    body = resp.split(b"\r\n\r\n", 1)[1]
    assert set(json.loads(body)) == {"error", "message"}
    assert b"Connection: close" in resp
    healthy(fast_env)


def test_slowloris_is_cut_off_and_others_are_served(fast_env):
    slow = []
    for _ in range(4):
        s = fast_env.connect()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        slow.append(s)
    healthy(fast_env)  # a fifth client is served meanwhile
    for s in slow:
        s.settimeout(10)
        resp = b""
        while True:  # the server answers 408 and closes once header_timeout has passed
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
        assert status_of(resp) == 408
        s.close()
    assert fast_env.server.metrics.errors["timeout"] >= 4
    healthy(fast_env)


def test_trickled_header_bytes_do_not_extend_the_deadline(fast_env):
    s = fast_env.connect()
    s.settimeout(10)
    closed = False
    try:
        for _ in range(200):  # one byte every 50 ms would take 10 s: the deadline is 0.5 s total
            s.sendall(b"X")
            ready = s.recv(65536) if _readable(s, 0.05) else None
            if ready is not None:
                closed = True
                break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    finally:
        s.close()
    assert closed
    healthy(fast_env)


def _readable(sock, timeout):
    import select

    r, _, _ = select.select([sock], [], [], timeout)
    return bool(r)


def test_idle_connections_at_the_limit_are_displaced_oldest_first(fast_env):
    """Silent connections fill every slot: a newcomer displaces the oldest of them (it was
    refused with 503 before issue 13), and the count goes back to zero once they are gone."""
    held = [fast_env.connect() for _ in range(6)]
    try:
        wait_for(lambda: fast_env.server.metrics.connections_open == 6)
        resp = raw_exchange(
            fast_env, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status_of(resp) == 200
        held[0].settimeout(5)
        assert held[0].recv(100) == b""  # the oldest was closed by the server
    finally:
        for s in held:
            s.close()
    wait_for(lambda: fast_env.server.metrics.connections_open == 0)
    healthy(fast_env)


def split_responses(buf):
    """Parse consecutive responses (all with Content-Length) from one buffer."""
    out = []
    while buf:
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        n = int(headers["content-length"])
        out.append((int(lines[0].split(" ")[1]), rest[:n]))
        buf = rest[n:]
    return out


def test_keep_alive_and_pipelining(env, disk):
    t = env.ticket()
    s = env.connect()
    try:
        three = (
            "GET /v1/exports/%s/raw HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\n\r\n"
            "GET /v1/exports/%s/raw HTTP/1.1\r\nHost: x\r\nRange: bytes=100-199\r\n\r\n"
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (t, t)
        )
        s.sendall(three.encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    responses = split_responses(buf)
    assert [r[0] for r in responses] == [206, 206, 200]
    assert responses[0][1] == disk.model[:100]
    assert responses[1][1] == disk.model[100:200]


def test_disconnect_mid_stream_releases_everything(env):
    t = env.ticket()
    for path in ("raw", "vhd", "blocks"):
        s = env.connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(("GET /v1/exports/%s/%s HTTP/1.1\r\nHost: x\r\n\r\n" % (t, path)).encode())
        got = s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        s.close()  # RST while the server is streaming
    wait_for(lambda: env.server.metrics.connections_open == 0)
    wait_for(lambda: env.tickets.get(t).connections == 0)
    assert env.server.metrics.open_exports == 0
    healthy(env)


def test_revoking_a_ticket_stops_its_running_stream(env):
    t = env.ticket()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    s.settimeout(10)
    s.connect((env.host, env.port))
    try:
        s.sendall(("GET /v1/exports/%s/raw HTTP/1.1\r\nHost: x\r\n\r\n" % t).encode())
        head = s.recv(200)
        assert head.startswith(b"HTTP/1.1 200")
        env.tickets.revoke(t)
        received = len(head.split(b"\r\n\r\n", 1)[1]) if b"\r\n\r\n" in head else 0
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    finally:
        s.close()
    assert received < SIZE  # the server stopped between blocks and closed
    wait_for(lambda: env.server.metrics.connections_open == 0)
    healthy(env)


def test_metrics_are_prometheus_text(env):
    t = env.ticket()
    request(env, "/v1/exports/%s/blocks" % t)
    request(env, "/v1/exports/%s/raw" % ("0" * 32))
    status, headers, body = request(env, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in body.decode().splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = int(value)
    assert samples['fastpath_http_blocks_total{path="sendfile"}'] == 2
    assert samples['fastpath_http_blocks_total{path="assembled"}'] == 2
    assert samples['fastpath_http_bytes_sent_total{transport="blocks"}'] > 4 * (2 << 20)
    assert samples['fastpath_http_requests_total{status="200"}'] >= 1
    assert samples['fastpath_http_requests_total{status="403"}'] >= 1
    assert "fastpath_http_open_exports" in samples


def test_no_fd_leak_after_a_mixed_workload(env):
    healthy(env)
    wait_for(lambda: env.server.metrics.connections_open == 0)
    before = fd_count()
    t = env.ticket(base=True)
    for path in ("", "/extents", "/extents?context=changed", "/raw", "/vhd", "/blocks"):
        assert request(env, "/v1/exports/%s%s" % (t, path))[0] == 200
    request(env, "/v1/exports/%s/raw" % t, [("Range", "bytes=99999999999-")])
    raw_exchange(env, b"BAD\r\n\r\n")
    s = env.connect()
    s.sendall(("GET /v1/exports/%s/raw HTTP/1.1\r\nHost: x\r\n\r\n" % t).encode())
    s.recv(100)
    s.close()
    wait_for(lambda: env.server.metrics.connections_open == 0)
    wait_for(lambda: env.tickets.get(t).connections == 0)
    assert fd_count() == before


def test_a_client_that_stops_reading_is_dropped(make_server):
    env = make_server(limits=Limits(header_timeout=2.0, send_timeout=0.5, max_connections=4))
    t = env.tickets.create(
        "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11", "5d7a3b2c-1e0f-4a9b-8c7d-6e5f4a3b2c1d"
    ).id
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect((env.host, env.port))
    try:
        s.sendall(("GET /v1/exports/%s/raw HTTP/1.1\r\nHost: x\r\n\r\n" % t).encode())
        # Never read: the server's send stalls, and it gives up after send_timeout.
        wait_for(lambda: env.server.metrics.errors.get("client_disconnect", 0) == 1, timeout=30)
        wait_for(lambda: env.server.metrics.connections_open == 0)
        # The server closed its side: what the client can still read ends early (EOF or reset).
        received = 0
        try:
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < SIZE
    finally:
        s.close()
    wait_for(lambda: env.tickets.get(t).connections == 0)
    healthy(env)


def test_tls_port_drops_silent_and_garbage_clients(make_server, tmp_path):
    from tests.http.conftest import make_tls

    server_ctx, client_ctx, _ = make_tls(tmp_path)
    env = make_server(
        tls_context=server_ctx,
        tls_mode="require",
        limits=Limits(header_timeout=0.5, max_connections=8),
    )
    silent = env.connect()  # connects and never speaks
    garbage = env.connect()
    garbage.sendall(b"\x16\x03\x01\x00\x05hello-not-tls" * 10)  # looks like TLS, is not
    for s in (silent, garbage):
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
        s.close()
    wait_for(lambda: env.server.metrics.connections_open == 0)
    assert env.server.metrics.errors["timeout"] >= 1
    assert env.server.metrics.errors["tls_handshake"] >= 1
    raw = socket.create_connection((env.host, env.port), timeout=10)
    tls = client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(tls)[0] == 200
    finally:
        tls.close()


def test_metrics_extra_hook_appends_other_counters(make_server):
    from agent.http.metrics import prometheus_lines

    env = make_server()
    env.server.metrics_extra = lambda: prometheus_lines(
        "fastpath_nbd", {"open_connections": 3, "bytes-sent": 1.5, "mode": "x", "flag": True}
    )
    status, _, body = request(env, "/metrics")
    text = body.decode()
    assert "fastpath_nbd_open_connections 3\n" in text
    assert "fastpath_nbd_bytes_sent 1.5\n" in text
    assert "fastpath_nbd_mode" not in text and "fastpath_nbd_flag" not in text

    def broken():
        raise RuntimeError("hook failed")

    env.server.metrics_extra = broken
    status, _, body = request(env, "/metrics")
    assert status == 200 and b"fastpath_http_requests_total" in body


def test_thousands_of_pipelined_requests_and_the_per_connection_cap(make_server):
    env = make_server(limits=Limits(max_requests_per_connection=1500, header_timeout=5))
    s = env.connect(timeout=30)
    try:
        # Exactly as many as the cap: the server answers them all and then closes (announced
        # with Connection: close) instead of waiting for more (recv would time out otherwise).
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 1500)
        buf = b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    answers = split_responses(buf)
    assert len(answers) == 1500 and all(a == (200, b'{"status": "ok"}\n') for a in answers)
    last_head = buf[buf.rindex(b"HTTP/1.1 200") :].split(b"\r\n\r\n")[0]
    assert b"Connection: close" in last_head
    assert buf.count(b"Connection: close") == 1
    wait_for(lambda: env.server.metrics.connections_open == 0)
    healthy(env)


def test_connections_have_nodelay_and_json_answers_go_out_in_one_send(env):
    """Small answers split over two sends used to wait ~40 ms for the client's delayed ACK
    (Nagle): the server sets TCP_NODELAY and sends head and body together."""
    s = env.connect()
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == 200
        with env.server._conns_lock:
            conns = list(env.server._conns)
        assert len(conns) == 1
        assert conns[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        s.close()
    sent = []

    class Spy(object):
        def __init__(self, sock):
            self._sock = sock

        def __getattr__(self, name):
            return getattr(self._sock, name)

        def sendall(self, data):
            sent.append(bytes(data))
            return self._sock.sendall(data)

    from agent.http.response import Response

    class Conn(object):
        tls = False
        limits = env.server.limits
        server = env.server
        last_request = False

    a, b = socket.socketpair()
    try:
        conn = Conn()
        conn.sock = Spy(a)
        req = hp.RequestParser().feed(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = Response(conn, req)
        resp.send_json({"status": "ok"})
        assert len(sent) == 1 and sent[0].endswith(b'{"status": "ok"}\n')
    finally:
        a.close()
        b.close()


def test_random_garbage_from_many_clients_at_once(fast_env):
    """Fifty clients throwing seeded random bytes (some shaped like requests) at the same time."""
    import random
    import threading

    healthy(fast_env)
    wait_for(lambda: fast_env.server.metrics.connections_open == 0)
    before = fd_count()
    t = fast_env.tickets.create(
        "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11", "5d7a3b2c-1e0f-4a9b-8c7d-6e5f4a3b2c1d"
    ).id
    heads = [
        b"GET /v1/exports/%s/raw HTTP/1.1\r\nHost: x\r\nRange: bytes=" % t.encode(),
        b"GET /v1/exports/%s/blocks?start=" % t.encode(),
        b"GET / HTTP/1.1\r\n",
        b"",
    ]
    errors = []

    def client(seed):
        rnd = random.Random(seed)
        data = rnd.choice(heads) + rnd.randbytes(rnd.randrange(0, 3000))
        if rnd.random() < 0.5:
            data += b"\r\n\r\n"
        try:
            s = socket.create_connection((fast_env.host, fast_env.port), timeout=10)
        except OSError as exc:  # the connection cap (6) may refuse some: that is the point
            return exc
        try:
            s.sendall(data)
            while s.recv(65536):
                pass
        except OSError:
            pass
        except Exception as exc:
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(50)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    wait_for(lambda: fast_env.server.metrics.connections_open == 0, timeout=30)
    healthy(fast_env)
    wait_for(lambda: fast_env.server.metrics.connections_open == 0)
    assert fd_count() == before
    assert fast_env.server.metrics.errors.get("internal", 0) == 0
