"""Fixtures for the HTTP API tests: a small VHD chain, a ticket store, a running HttpServer.

The chain (written with agent.vhd's writer) is built so that every path of the servers is used:

    block 0: whole in the root file       -> sendfile
    block 1: split across child and root  -> assembled in memory
    block 2: whole in the child           -> sendfile
    block 3: partly written in the root   -> assembled (the unwritten sectors read as zeros)
    block 4: never written, and the disk's last, partial block (size is not block-aligned) -> hole

The base of incremental tickets is the root: its changed blocks are the child's (1 and 2).
"""

import gc
import os
import socket
import ssl
import subprocess
import time

import pytest

from agent.export import Counters
from agent.http.limits import Limits
from agent.http.server import HttpServer
from agent.sr import FileSR
from agent.tickets import TicketStore
from tests.fixtures.vhd import Level, build_chain, pattern

MiB = 1 << 20
SIZE = 9 * MiB + 512 * 1024  # 4.75 blocks of 2 MiB
VDI = "0b3c1f55-6a0e-4a57-9b64-2f8e6f1d1a11"
BASE_VDI = "6a8e4c1e-2f0d-4c53-8f3b-0c1d2e3f4a5b"


SR = "5d7a3b2c-1e0f-4a9b-8c7d-6e5f4a3b2c1d"


class Disk(object):
    def __init__(self, sr_root, paths, models):
        self.sr_root = sr_root
        self.root, self.leaf = paths
        self.root_model, self.model = (bytes(m) for m in models)


@pytest.fixture(scope="session")
def disk(tmp_path_factory):
    sr_root = tmp_path_factory.mktemp("sr-mount")
    d = sr_root / SR
    d.mkdir()
    levels = [
        Level(
            SIZE,
            writes=[
                (0, pattern(1, 2 * MiB)),
                (2 * MiB, pattern(2, 2 * MiB)),
                (6 * MiB + 4096, pattern(3, 512 * 1024)),
            ],
            name="%s.vhd" % BASE_VDI,
        ),
        Level(
            SIZE,
            writes=[(2 * MiB + 64 * 1024, pattern(4, 128 * 1024)), (4 * MiB, pattern(5, 2 * MiB))],
            name="%s.vhd" % VDI,
        ),
    ]
    paths, models = build_chain(d, levels)
    return Disk(str(sr_root), paths, models)


class Clock(object):
    """A settable clock for the ticket store (expiry without sleeping)."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset


class Env(object):
    def __init__(self, disk, server, tickets, clock, counters):
        self.disk = disk
        self.server = server
        self.tickets = tickets
        self.clock = clock
        self.counters = counters
        self.host, self.port = server.address

    def ticket(self, base=False, ttl=60, vdi=VDI, max_connections=16):
        t = self.tickets.create(
            vdi, SR, BASE_VDI if base else None, ttl=ttl, max_connections=max_connections
        )
        return t.id

    def connect(self, timeout=10):
        return socket.create_connection((self.host, self.port), timeout=timeout)


@pytest.fixture
def make_server(disk):
    """An HttpServer wired exactly as the daemon wires it: TicketStore, FileSR.open_export."""
    servers = []

    def make(tls_context=None, tls_mode=None, limits=None):
        clock = Clock()
        tickets = TicketStore(clock=clock)
        counters = Counters()
        file_sr = FileSR([disk.sr_root])

        def open_export(ticket):
            return file_sr.open_export(
                ticket.vdi, ticket.sr, ticket.base, counters=counters, name=ticket.id
            )

        server = HttpServer(
            ("127.0.0.1", 0),
            tickets,
            open_export,
            tls_context=tls_context,
            tls_mode=tls_mode,
            limits=limits,
        )
        server.start()
        servers.append(server)
        return Env(disk, server, tickets, clock, counters)

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def env(make_server):
    return make_server(
        limits=Limits(header_timeout=2.0, idle_timeout=5.0, send_timeout=10.0, max_connections=16)
    )


def request(env, path, headers=(), method="GET", sock=None, version="HTTP/1.1"):
    """One request on a fresh (or given) connection -> (status, headers dict, body bytes)."""
    own = sock is None
    if own:
        sock = env.connect()
    try:
        lines = ["%s %s %s" % (method, path, version), "Host: test"]
        lines += ["%s: %s" % kv for kv in headers]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return read_response(sock, head_only=(method == "HEAD"))
    finally:
        if own:
            sock.close()


def read_response(sock, head_only=False):
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError("connection closed before the response head (%r)" % buf[:200])
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if head_only:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        return status, headers, read_chunked(sock, bytearray(rest))
    if "content-length" not in headers:  # close-delimited (an HTTP/1.0 stream)
        body = bytearray(rest)
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return status, headers, bytes(body)
            body += data
    length = int(headers["content-length"])
    body = bytearray(rest)
    while len(body) < length:
        data = sock.recv(min(1 << 20, length - len(body)))
        if not data:
            raise EOFError("body truncated at %d of %d bytes" % (len(body), length))
        body += data
    return status, headers, bytes(body)


def read_chunked(sock, buf):
    """The body of a chunked response whose first bytes are buf; EOFError if it is cut short
    (no final zero-length chunk)."""
    body = bytearray()

    def need(n):
        while len(buf) < n:
            data = sock.recv(1 << 20)
            if not data:
                raise EOFError("chunked body truncated after %d bytes" % len(body))
            buf.extend(data)

    while True:
        while b"\r\n" not in buf:
            need(len(buf) + 1)
        line, _, rest = bytes(buf).partition(b"\r\n")
        del buf[: len(line) + 2]
        size = int(line.split(b";")[0], 16)
        need(size + 2)
        if bytes(buf[size : size + 2]) != b"\r\n":
            raise ValueError("chunk of %d bytes not followed by CRLF" % size)
        body += buf[:size]
        del buf[: size + 2]
        if size == 0:
            return bytes(body)


def wait_for(cond, timeout=10.0):
    """Poll cond() until true (server threads finish after the client has its answer)."""
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("condition not reached within %ss" % timeout)
        time.sleep(0.01)


def fd_count():
    """Open fds of this (test) process. Collects garbage first: objects of earlier tests in the
    same worker (sockets, files) otherwise close whenever the collector runs, in the middle of a
    test's before/after comparison."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def make_tls(tmp_path):
    """A self-signed certificate (openssl) and contexts for the server and a pinning client."""
    cert = os.path.join(str(tmp_path), "cert.pem")
    key = os.path.join(str(tmp_path), "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    return server_ctx, client_ctx, cert
