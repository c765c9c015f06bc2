"""agent.nbd.server in-process with a fake export: the error paths that real files rarely reach
(a VHD file shorter than its metadata promised in the middle of a sendfile, a failing read plan).
Every test runs in clear text (sendfile) and over TLS (pread, then the TLS socket in its timeout
mode: agent.nbd.transport)."""

import os
import socket
import ssl
import struct
import time

import pytest

from agent.export import HOLE, SENDFILE, ChainChanged, Counters
from agent.nbd.server import NBDServer
from agent.tickets import TicketStore
from tests.nbd.test_hostile import Raw, error_of

MiB = 1 << 20


class FakeExport(object):
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = MiB
        self.block_size = 2 * MiB
        self.description = "fake"
        self.closed = False
        self.changed_under_us = None  # set to a message to make check() fail like ChainGuard

    def check(self):
        if self.changed_under_us:
            raise ChainChanged(self.changed_under_us)

    def plan_read(self, offset, length):
        if offset >= 512 * 1024:
            raise OSError(5, "simulated read failure")
        if offset >= 256 * 1024:
            return [(HOLE, length)]
        return [(SENDFILE, self.fd, offset, length)]

    def extents(self, offset, length):
        return [(offset, length, "data")]

    def changed(self, offset, length):
        return [(offset, length, True)]

    def close(self):
        self.closed = True
        os.close(self.fd)


class Address(object):
    def __init__(self, server, tls=False):
        self.host, self.port = server.address
        self.tls = tls


class TlsRaw(Raw):
    """Raw, upgraded with NBD_OPT_STARTTLS right after the greeting."""

    def greet(self, flags=3):
        Raw.greet(self, flags)
        self.option(5)
        assert self.replies() == [(1, b"")]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock)

    def closed_by_server(self):
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False


def client(addr):
    return TlsRaw(addr) if addr.tls else Raw(addr)


@pytest.fixture(params=["off", "require"])
def served(tmp_path, request):
    """A server on a 4096-byte file, in clear text and over TLS."""
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(range(256)) * 16)  # 4096 bytes: reads past it come up short
    store = TicketStore()
    exports = []

    def open_export(ticket):
        e = FakeExport(str(path))
        exports.append(e)
        return e

    fds_before = len(os.listdir("/proc/self/fd"))
    ctx = None
    tls_mode = request.param
    if tls_mode != "off":
        tls = request.getfixturevalue("tls_files")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls["cert"], tls["key"])
    server = NBDServer(
        store, open_export, port=0, tls_mode=tls_mode, ssl_context=ctx, counters=Counters()
    ).start()
    ticket = store.create("fake-vdi")
    yield server, Address(server, ctx is not None), ticket.id, path.read_bytes(), exports
    server.stop()
    assert all(e.closed for e in exports)
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_short_file_mid_sendfile_pads_then_reports_eio(served):
    server, addr, tid, data, _ = served
    c = client(addr)
    c.greet()
    c.go(tid)
    c.request(0, 0, 8192, handle=1)
    chunks = c.structured_reply()
    assert chunks[0][1] == 1 and len(chunks[0][3]) == 8 + 8192  # the chunk is completed...
    assert chunks[0][3][8 : 8 + 4096] == data and not any(
        chunks[0][3][8 + 4096 :]
    )  # ...with zeroes
    assert error_of(chunks) == 5 and chunks[-1][0] & 1
    c.request(0, 100, 50, handle=2)  # the connection goes on
    chunks = c.structured_reply()
    assert chunks[0][3][8:] == data[100:150] and error_of(chunks) == 0
    c.request(0, 600 * 1024, 10, handle=3)  # a failing plan: EIO, nothing sent before
    chunks = c.structured_reply()
    assert len(chunks) == 1 and error_of(chunks) == 5
    c.request(0, 300 * 1024, 4096, flags=4, handle=4)  # DF over a hole: explicit zeroes
    chunks = c.structured_reply()
    assert chunks[0][1] == 1 and chunks[0][3][8:] == bytes(4096)
    c.request(2)
    c.close()
    assert server.stats()["request_errors"] == 2


def test_short_file_after_a_simple_reply_header_hangs_up(served):
    server, addr, tid, data, _ = served
    c = client(addr)
    c.greet()
    c.go(tid, structured=False)
    c.request(0, 0, 8192, handle=1)
    assert struct.unpack(">IIQ", c.recv_exact(16)) == (0x67446698, 0, 1)
    assert c.recv_exact(4096) == data
    # The header promised data it cannot have: a hard disconnect before the reply is complete
    # (zero padding follows, but never the reply's last byte).
    assert c.closed_by_server()
    c.close()


def test_chain_changed_during_a_streamed_read_is_an_error_chunk(served):
    """Bytes sent with sendfile are read while they stream: the export is checked again before
    the final chunk, and a chain that changed meanwhile turns the read into EIO."""
    server, addr, tid, data, exports = served
    c = client(addr)
    c.greet()
    c.go(tid)
    c.request(0, 0, 1024, handle=1)
    chunks = c.structured_reply()
    assert chunks[0][3][8:] == data[:1024] and error_of(chunks) == 0
    exports[0].changed_under_us = "the VHD chain changed under the export: test"
    c.request(0, 0, 1024, handle=2)
    chunks = c.structured_reply()
    assert error_of(chunks) == 5 and chunks[-1][0] & 1  # the final chunk is the error
    assert b"changed under the export" in chunks[-1][3]
    c.request(0, 300 * 1024, 4096, handle=3)  # holes come from metadata: still answered
    chunks = c.structured_reply()
    assert error_of(chunks) == 0
    c.request(2)
    c.close()


def test_chain_changed_during_a_simple_reply_withholds_the_last_byte(served):
    server, addr, tid, data, exports = served
    c = client(addr)
    c.greet()
    c.go(tid, structured=False)
    c.request(0, 0, 1024, handle=1)
    assert struct.unpack(">IIQ", c.recv_exact(16)) == (0x67446698, 0, 1)
    assert c.recv_exact(1024) == data[:1024]
    exports[0].changed_under_us = "the VHD chain changed under the export: test"
    c.request(0, 0, 1024, handle=2)
    assert struct.unpack(">IIQ", c.recv_exact(16)) == (0x67446698, 0, 2)
    assert c.recv_exact(1023) == data[:1023]
    assert c.closed_by_server()  # never the 1024th byte: the client sees a broken reply
    c.close()


def test_stop_closes_live_connections(served):
    server, addr, tid, _, exports = served
    c = client(addr)
    c.greet()
    c.go(tid)
    server.stop()
    assert c.closed_by_server()
    c.close()
    assert server.connections() == []
    assert all(e.closed for e in exports)


def test_a_tls_client_that_stops_reading_is_cut_off(tmp_path, tls_files):
    """A TLS client that asks for data and never reads it loses its connection once a write
    makes no progress for send_timeout (the TLS socket's timeout mode, and SO_SNDTIMEO under it):
    no worker hangs in SSL_write holding the send lock, and the export is released."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(4 * MiB))

    class BigExport(FakeExport):
        def __init__(self, p):
            FakeExport.__init__(self, p)
            self.size = 4 * MiB

        def plan_read(self, offset, length):
            return [(SENDFILE, self.fd, offset, length)]

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_files["cert"], tls_files["key"])
    store = TicketStore()
    exports = []

    def open_export(ticket):
        exports.append(BigExport(str(path)))
        return exports[-1]

    server = NBDServer(
        store, open_export, port=0, tls_mode="require", ssl_context=ctx, send_timeout=1
    ).start()
    try:
        c = TlsRaw(Address(server, True))
        c.greet()
        c.go(store.create("fake-vdi").id)
        for handle in range(32):  # 128 MiB asked for, far more than the socket buffers hold
            c.request(0, 0, 4 * MiB, handle=handle)
        deadline = time.monotonic() + 60
        while server.connections() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.connections() == []
        assert exports and all(e.closed for e in exports)
        c.close()
    finally:
        server.stop()
