"""Hostile clients over raw sockets. After each, the agent still serves a well-behaved client (nbdcopy,
compared with qemu-img convert) and holds no extra file descriptors.

One agent per module (started with a short handshake timeout) keeps this fast; every test measures
its own fd baseline.
"""

import shutil
import socket
import struct

import pytest

from tests.fixtures.nbd import AgentProcess, FileSRTree, qemu_raw_bytes, run

MiB = 1 << 20
IHAVEOPT = b"IHAVEOPT"
REQ_MAGIC = 0x25609513

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdcopy", "qemu-img", "qemu-io")),
    reason="nbdcopy/qemu-img/qemu-io not installed (make setup installs them)",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    sr = FileSRTree(tmp / "sr-mount")
    vdi = sr.qemu_vdi(8 * MiB, [(0, 3 * MiB, 0x61), (5 * MiB, 64 * 1024, 0x62)])
    raw = qemu_raw_bytes(sr.path(vdi), tmp)
    agent = AgentProcess(tmp, [sr.root], extra=["--handshake-timeout", "2", "--idle-timeout", "3"])
    try:
        yield {"agent": agent, "vdi": vdi, "raw": raw, "tmp": tmp, "sr": sr}
    finally:
        agent.stop()


@pytest.fixture
def ctx(env):
    agent = env["agent"]
    assert agent.wait_idle()
    env["baseline"] = agent.settled_fd_count()
    env["ticket"] = agent.ticket(env["vdi"])
    yield env
    # The agent survived: a well-behaved client gets the right bytes, and no fd leaked.
    assert agent.proc.poll() is None, agent.log()
    out = str(env["tmp"] / "check.raw")
    run(["nbdcopy", agent.uri(agent.ticket(env["vdi"])), out])
    with open(out, "rb") as f:
        assert f.read() == env["raw"]
    assert agent.wait_idle()
    assert agent.wait_fds(env["baseline"]) <= env["baseline"]


class Raw(object):
    """A minimal hand-rolled NBD client that can misbehave."""

    def __init__(self, agent, timeout=10):
        self.sock = socket.create_connection((agent.host, agent.port), timeout=timeout)
        self.buf = b""

    def recv_exact(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("server closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def closed_by_server(self):
        """True when the server closes (bounded by the socket timeout)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def greet(self, flags=3):
        assert self.recv_exact(18)[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, opt, data=b""):
        self.sock.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)

    def replies(self):
        """Option replies up to the final one: [(type, data)]."""
        out = []
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
            assert magic == 0x3E889045565A9
            out.append((rtype, self.recv_exact(length)))
            if rtype in (1,) or rtype & 0x80000000:
                return out

    def go(self, name, structured=True, contexts=()):
        if structured:
            self.option(8)
            assert self.replies() == [(1, b"")]
        if contexts:
            raw = name.encode()
            data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(contexts))
            for c in contexts:
                data += struct.pack(">I", len(c)) + c.encode()
            self.option(10, data)
            self.replies()
        raw = name.encode()
        self.option(7, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        return self.replies()

    def request(self, cmd, offset=0, length=0, flags=0, handle=1, payload=b""):
        self.sock.sendall(
            struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, handle, offset, length) + payload
        )

    def structured_reply(self):
        """All chunks of one structured reply: [(flags, type, handle, payload)]."""
        chunks = []
        while True:
            magic, flags, rtype, handle, length = struct.unpack(">IHHQI", self.recv_exact(20))
            assert magic == 0x668E33EF
            chunks.append((flags, rtype, handle, self.recv_exact(length)))
            if flags & 1:
                return chunks

    def close(self):
        self.sock.close()


def error_of(chunks):
    for _flags, rtype, _h, payload in chunks:
        if rtype & 0x8000:
            return struct.unpack(">I", payload[:4])[0]
    return 0


def test_garbage_handshake(ctx):
    c = Raw(ctx["agent"])
    c.recv_exact(18)
    c.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.closed_by_server()
    c.close()


def test_truncated_handshakes(ctx):
    for cut in (0, 2):
        c = Raw(ctx["agent"])
        c.recv_exact(18)
        c.sock.sendall(b"\0\0\0\3"[:cut])
        c.close()
    c = Raw(ctx["agent"])
    c.greet()
    c.sock.sendall(IHAVEOPT + b"\0\0")  # half an option header, then silence
    assert c.closed_by_server()  # handshake timeout (2 s here)
    c.close()


def test_silent_client_hits_handshake_timeout(ctx):
    c = Raw(ctx["agent"])
    assert c.closed_by_server()
    c.close()


def test_unknown_options_then_go(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    for opt in (4, 11, 99, 0x7FFFFFFF):
        c.option(opt, b"x" * 300)
        ((rtype, _msg),) = c.replies()
        assert rtype == 0x80000001
    replies = c.go(ctx["ticket"])
    assert replies[-1] == (1, b"")
    c.request(0, 0, 4096)
    chunks = c.structured_reply()
    assert chunks[0][3][8:] == ctx["raw"][:4096]
    c.request(2)
    c.close()


def test_oversized_option_length_closes(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    c.sock.sendall(IHAVEOPT + struct.pack(">II", 7, 0xFFFFFFF0))
    assert c.closed_by_server()
    c.close()


def test_wrong_ticket(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    for name in ("0" * 32, "../../etc/passwd", ctx["vdi"], "x" * 4096):
        ((rtype, msg),) = c.go(name, structured=False)
        assert rtype == 0x80000006 and b"unknown ticket" in msg
    c.option(1, b"nope")  # EXPORT_NAME cannot fail politely: the server hangs up
    assert c.closed_by_server()
    c.close()


def test_expired_ticket_refused_and_its_connection_closed(ctx):
    agent = ctx["agent"]
    tid = agent.admin(op="create_ticket", vdi=ctx["vdi"], ttl=1.5)["export_name"]
    c = Raw(agent, timeout=15)
    c.greet()
    assert c.go(tid)[-1] == (1, b"")
    assert c.closed_by_server()  # the reaper closes it once the ticket expires
    c.close()
    c = Raw(agent)
    c.greet()
    ((rtype, msg),) = c.go(tid)
    assert rtype == 0x80000006 and b"expired" in msg
    c.close()


def test_revoked_ticket_closes_its_connections(ctx):
    agent = ctx["agent"]
    c = Raw(agent)
    c.greet()
    assert c.go(ctx["ticket"])[-1] == (1, b"")
    c.request(0, 0, 512)
    c.structured_reply()
    agent.admin(op="revoke_ticket", id=ctx["ticket"])
    assert c.closed_by_server()
    c.close()
    c = Raw(agent)
    c.greet()
    ((rtype, msg),) = c.go(ctx["ticket"])
    assert rtype == 0x80000006 and b"revoked" in msg
    c.close()


def test_ticket_connection_limit(ctx):
    agent = ctx["agent"]
    tid = agent.admin(op="create_ticket", vdi=ctx["vdi"], max_connections=1)["export_name"]
    a = Raw(agent)
    a.greet()
    assert a.go(tid)[-1] == (1, b"")
    b = Raw(agent)
    b.greet()
    ((rtype, msg),) = b.go(tid)
    assert rtype == 0x80000006 and b"connections" in msg
    a.request(2)
    a.close()
    b.close()


def test_bad_requests_fail_alone(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    c.go(ctx["ticket"])
    size = len(ctx["raw"])
    cases = [
        ({"cmd": 0, "offset": size - 100, "length": 512}, 22),  # past the end
        ({"cmd": 0, "offset": 2**64 - 1, "length": 1}, 22),
        ({"cmd": 0, "offset": 0, "length": 33 * MiB}, 22),  # over the advertised maximum
        ({"cmd": 0, "offset": 0, "length": 512, "flags": 0x8000}, 22),  # unknown flag
        ({"cmd": 0, "offset": 0, "length": 512, "flags": 1}, 22),  # FUA not advertised
        ({"cmd": 4, "offset": 0, "length": 512}, 1),  # TRIM
        ({"cmd": 6, "offset": 0, "length": 512}, 1),  # WRITE_ZEROES
        ({"cmd": 7, "offset": 0, "length": 512}, 22),  # BLOCK_STATUS, no context
        ({"cmd": 42, "offset": 0, "length": 0}, 22),
        ({"cmd": 1, "offset": 0, "length": 5, "payload": b"hello"}, 1),  # WRITE: payload skipped
    ]
    for i, (req, code) in enumerate(cases):
        c.request(handle=100 + i, **req)
        chunks = c.structured_reply()
        assert chunks[-1][2] == 100 + i
        assert error_of(chunks) == code, (req, chunks)
    c.request(0, 4096, 100, handle=7)
    chunks = c.structured_reply()
    assert chunks[0][3][8:] == ctx["raw"][4096:4196]
    c.request(2)
    c.close()


def test_simple_replies_without_structured(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    c.go(ctx["ticket"], structured=False)
    c.request(0, 3 * MiB - 10, 20, handle=5)  # data then hole, as plain bytes
    magic, err, handle = struct.unpack(">IIQ", c.recv_exact(16))
    assert (magic, err, handle) == (0x67446698, 0, 5)
    assert c.recv_exact(20) == ctx["raw"][3 * MiB - 10 : 3 * MiB + 10]
    c.request(0, len(ctx["raw"]), 1, handle=6)
    assert struct.unpack(">IIQ", c.recv_exact(16)) == (0x67446698, 22, 6)
    c.request(2)
    c.close()


def test_ten_thousand_tiny_requests(ctx):
    c = Raw(ctx["agent"], timeout=60)
    c.greet()
    c.go(ctx["ticket"], contexts=["base:allocation"])
    n = 10000
    reqs = b"".join(
        struct.pack(
            ">IHHQQI",
            REQ_MAGIC,
            0,
            7 if i % 10 == 0 else 0,
            i,
            (i * 4099) % (len(ctx["raw"]) - 8),
            8,
        )
        for i in range(n)
    )
    c.sock.sendall(reqs)
    seen = set()
    for _ in range(n):
        chunks = c.structured_reply()
        handle = chunks[0][2]
        seen.add(handle)
        if handle % 10:
            off = (handle * 4099) % (len(ctx["raw"]) - 8)
            data = b""
            for _f, rtype, _h, payload in chunks:
                if rtype == 1:
                    data += payload[8:]
                elif rtype == 2:
                    data += b"\0" * struct.unpack(">I", payload[8:12])[0]
            assert data == ctx["raw"][off : off + 8]
    assert seen == set(range(n))
    c.request(2)
    c.close()


def test_disconnect_mid_reply(ctx):
    for _ in range(3):
        c = Raw(ctx["agent"])
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.greet()
        c.go(ctx["ticket"], structured=False)
        for h in range(8):
            c.request(0, 0, len(ctx["raw"]), handle=h)
        c.recv_exact(1000)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST with replies still queued


def test_bad_request_magic_closes(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    c.go(ctx["ticket"])
    c.sock.sendall(b"\xde\xad\xbe\xef" * 7)
    assert c.closed_by_server()
    c.close()


def test_unknown_client_flags_close(ctx):
    c = Raw(ctx["agent"])
    c.greet(flags=0xFF)
    assert c.closed_by_server()
    c.close()
    c = Raw(ctx["agent"])
    c.greet(flags=0)  # not fixed newstyle
    assert c.closed_by_server()
    c.close()


def test_idle_connection_is_closed(ctx):
    c = Raw(ctx["agent"], timeout=30)
    c.greet()
    c.go(ctx["ticket"])
    c.request(0, 0, 512)
    c.structured_reply()
    assert c.closed_by_server()  # --idle-timeout 3 with nothing in flight
    c.close()


def test_df_read_is_one_content_chunk(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    c.go(ctx["ticket"])
    off, n = 6 * MiB - 4096, 8192  # end of allocated block 2, start of unallocated block 3
    c.request(0, off, n, flags=4, handle=3)
    chunks = c.structured_reply()
    content = [ch for ch in chunks if ch[1] in (1, 2)]
    assert len(content) == 1 and content[0][1] == 1
    assert struct.unpack(">Q", content[0][3][:8])[0] == off
    assert content[0][3][8:] == ctx["raw"][off : off + n]
    assert chunks[-1][0] & 1
    # without DF the hole is an OFFSET_HOLE chunk
    c.request(0, off, n, handle=4)
    types = [ch[1] for ch in c.structured_reply()]
    assert 1 in types and 2 in types
    c.request(2)
    c.close()


def test_block_status_both_contexts_and_req_one(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    c.go(ctx["ticket"], contexts=["base:allocation", "fastpath:changed", "qemu:nope"])
    size = len(ctx["raw"])
    c.request(7, 0, size, handle=9)
    chunks = c.structured_reply()
    assert [ch[1] for ch in chunks] == [5, 5] and chunks[-1][0] & 1 and not chunks[0][0] & 1
    by_ctx = {}
    for _f, _t, _h, payload in chunks:
        (ctx_id,) = struct.unpack(">I", payload[:4])
        by_ctx[ctx_id] = [
            struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)
        ]
    assert sorted(by_ctx) == [1, 2]
    for descs in by_ctx.values():
        assert sum(n for n, _ in descs) == size
    # allocation: holes read as zero in qemu's decoding
    pos = 0
    for n, flags in by_ctx[1]:
        if flags & 1:
            assert flags == 3 and not any(ctx["raw"][pos : pos + n])
        pos += n
    # changed (no base) at block granularity: blocks 0, 1 (data up to 3 MiB) and 2 (5 MiB)
    assert by_ctx[2] == [(6 * MiB, 1), (size - 6 * MiB, 0)]  # qemu rounds the size up (CHS)
    c.request(7, 512, 100, flags=8, handle=10)  # REQ_ONE: one descriptor per context, <= length
    for _f, _t, _h, payload in c.structured_reply():
        assert len(payload) == 12 and struct.unpack(">I", payload[4:8])[0] <= 100
    c.request(2)
    c.close()


def test_vhd_truncated_under_the_server(ctx):
    """The file shrinks while it is served: the read fails with EIO (an error chunk after zero
    padding), the connection and the server go on."""
    sr = ctx["sr"]
    vdi = sr.qemu_vdi(8 * MiB, [(0, 4 * MiB, 0x77)])
    agent = ctx["agent"]
    tid = agent.ticket(vdi)
    c = Raw(agent)
    c.greet()
    c.go(tid)
    c.request(0, 0, 4096, handle=1)
    assert c.structured_reply()[0][3][8:] == b"\x77" * 4096
    with open(sr.path(vdi), "r+b") as f:
        f.truncate(2 * MiB)
    c.request(0, 2 * MiB, 2 * MiB, handle=2)
    chunks = c.structured_reply()
    assert error_of(chunks) == 5, chunks[-1][:3]
    c.request(0, 6 * MiB, 4096, handle=3)  # a hole still reads
    chunks = c.structured_reply()
    assert error_of(chunks) == 0 and chunks[0][1] == 2
    c.request(2)
    c.close()


def test_server_connection_limit(tmp_path, env):
    agent = AgentProcess(tmp_path, [env["sr"].root], extra=["--max-connections", "2"])
    try:
        ticket = agent.ticket(env["vdi"])
        a, b = Raw(agent), Raw(agent)
        a.greet()
        b.greet()
        assert a.go(ticket)[-1] == (1, b"") and b.go(ticket)[-1] == (1, b"")
        c = Raw(agent)
        assert c.closed_by_server()  # refused: two clients in transmission already
        c.close()
        a.close()
        b.close()
        assert agent.wait_idle()
        # Silent connections without a ticket hold nothing: a newcomer displaces the oldest.
        e, f = Raw(agent), Raw(agent)
        e.greet()
        f.greet()
        g = Raw(agent)
        g.greet()
        assert g.go(ticket)[-1] == (1, b"")
        assert e.closed_by_server()
        g.request(2)
        for r in (e, f, g):
            r.close()
        assert agent.wait_idle()
        d = Raw(agent)
        d.greet()
        assert d.go(agent.ticket(env["vdi"]))[-1] == (1, b"")
        d.request(2)
        d.close()
        assert agent.stats()["refused_connections"] >= 1
    finally:
        agent.stop()


def test_tls_hostile(tmp_path, env, tls_files):
    nbd = pytest.importorskip(
        "nbd", reason="libnbd Python bindings (python3-libnbd) not importable"
    )
    agent = AgentProcess(
        tmp_path,
        [env["sr"].root],
        tls="require",
        extra=[
            "--tls-cert",
            tls_files["cert"],
            "--tls-key",
            tls_files["key"],
            "--handshake-timeout",
            "3",
        ],
    )
    try:
        tid = agent.ticket(env["vdi"])
        baseline = agent.settled_fd_count()
        # Options before STARTTLS are refused with TLS_REQD; ABORT still works.
        c = Raw(agent)
        c.greet()
        ((rtype, _),) = c.go(tid, structured=False)
        assert rtype == 0x80000005
        c.option(3)
        assert c.replies()[0][0] == 0x80000005
        c.option(2)
        assert c.replies() == [(1, b"")]
        c.close()
        # EXPORT_NAME in clear text: hang up.
        c = Raw(agent)
        c.greet()
        c.option(1, tid.encode())
        assert c.closed_by_server()
        c.close()
        # STARTTLS accepted, then garbage instead of a ClientHello.
        c = Raw(agent)
        c.greet()
        c.option(5)
        assert c.replies() == [(1, b"")]
        c.sock.sendall(b"\x00" * 64 + b"not tls at all")
        assert c.closed_by_server()
        c.close()
        # STARTTLS accepted, then silence: the handshake timeout applies.
        c = Raw(agent)
        c.greet()
        c.option(5)
        assert c.replies() == [(1, b"")]
        assert c.closed_by_server()
        c.close()
        # A real TLS client still gets the data.
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(tls_files["dir"])
        h.set_export_name(tid)
        h.connect_tcp(agent.host, str(agent.port))
        assert h.pread(len(env["raw"]), 0) == env["raw"]
        h.shutdown()
        assert agent.wait_idle()
        assert agent.wait_fds(baseline) <= baseline
    finally:
        agent.stop()


def test_flush_and_cache_are_harmless_successes(ctx):
    c = Raw(ctx["agent"])
    c.greet()
    c.go(ctx["ticket"], structured=False)
    c.request(3, handle=1)  # FLUSH (not advertised; nothing to flush on a read-only export)
    assert struct.unpack(">IIQ", c.recv_exact(16)) == (0x67446698, 0, 1)
    c.request(5, 0, 4096, handle=2)  # CACHE
    assert struct.unpack(">IIQ", c.recv_exact(16)) == (0x67446698, 0, 2)
    c.request(5, len(ctx["raw"]), 4096, handle=3)  # CACHE past the end
    assert struct.unpack(">IIQ", c.recv_exact(16)) == (0x67446698, 22, 3)
    c.request(2)
    c.close()
