"""agent.nbd.server when a connection's thread cannot be started (RuntimeError "can't start new
thread": the process is out of threads or memory). The accepted connection must be closed and its
slot given back, and the server must go on accepting: before, the exception killed the accept
thread (the server never accepted again) and the connection stayed counted for good."""

import select
import socket
import ssl
import threading
import time
import types

import pytest

from agent.export import Counters
from agent.nbd import server as server_mod
from agent.nbd import transport as transport_mod
from agent.nbd.server import NBDServer
from agent.tickets import TicketStore
from tests.nbd.test_hostile import Raw
from tests.nbd.test_server_inproc import Address, FakeExport


@pytest.fixture
def failing_thread_starts(monkeypatch):
    """The next `n[0]` connection threads fail to start."""
    n = [1]

    class Thread(threading.Thread):
        def start(self):
            if self.name.startswith("nbd-conn-") and n[0] > 0:
                n[0] -= 1
                raise RuntimeError("can't start new thread")
            return super().start()

    fake = types.SimpleNamespace(**vars(threading))
    fake.Thread = Thread
    monkeypatch.setattr(server_mod, "threading", fake)
    return n


def test_connection_thread_that_cannot_start_is_closed_and_forgotten(
    tmp_path, failing_thread_starts
):
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(4096))
    store = TicketStore()
    counters = Counters()
    server = NBDServer(
        store,
        lambda ticket: FakeExport(str(path)),
        port=0,
        tls_mode="off",
        counters=counters,
        max_connections=1,
    ).start()
    try:
        addr = Address(server)
        first = Raw(addr, timeout=10)
        try:
            assert first.closed_by_server()  # closed at once, no greeting
        finally:
            first.sock.close()
        assert server.connections() == []
        assert counters.snapshot().get("refused_connections") == 1
        # the server still accepts, and the slot (max_connections=1) is free again
        second = Raw(addr, timeout=10)
        try:
            second.greet()
        finally:
            second.sock.close()
    finally:
        server.stop()
    assert failing_thread_starts[0] == 0
    assert counters.snapshot().get("connections") == 1  # only the one served


def test_abort_of_a_tls_connection_never_sends_clear_text(tmp_path, tls_files, monkeypatch):
    """abort() (ticket revoked, server stopping) runs in another thread than the workers that send.
    SSLSocket.shutdown() drops the TLS object before it shuts the socket down, and a worker sending
    in between wrote its bytes (disk data) in clear text. Forced interleaving: a send runs at the
    moment the socket is shut down; the client must get it encrypted (or not at all).

    The send stands for a worker's, so it runs when a worker could: after the reader thread sent
    the handshake's last reply and is waiting for requests. Injected any earlier, it raced the
    reader's own SSL_write of the GO reply on the same SSL object (the client can read that reply
    before OpenSSL is done with the write): OpenSSL failed the injected write with BAD_LENGTH, the
    test swallowed it, and the client read a clean EOF (`(b'', False)`, ~1 run in 5 under load)."""
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(4096))
    store = TicketStore()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_files["cert"], tls_files["key"])
    server = NBDServer(
        store,
        lambda ticket: FakeExport(str(path)),
        port=0,
        tls_mode="require",
        ssl_context=ctx,
        counters=Counters(),
    ).start()
    tid = store.create("fake-vdi").id
    client = Raw(Address(server), timeout=10)
    try:
        client.greet()
        client.option(5)  # STARTTLS
        assert client.replies() == [(1, b"")]
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE
        client.sock = cctx.wrap_socket(client.sock, server_hostname="127.0.0.1")
        (conn,) = server.connections()  # counted from accept on
        # The reader waits for requests (select, after its abort check): from then on only
        # workers write, under send_lock, and only abort() can wake the reader.
        real_select = select.select
        waiting = threading.Event()

        def watched_select(rlist, *rest):
            if threading.current_thread().name == "nbd-conn-%d" % conn.id and conn._pool:
                waiting.set()
            return real_select(rlist, *rest)

        monkeypatch.setattr(select, "select", watched_select)
        assert client.go(tid)[-1][0] == 1  # in transmission, over TLS
        assert waiting.wait(10), "the connection never waited for a request"
        assert conn.tls

        real_shutdown = socket.socket.shutdown
        injected = []

        def shutdown(sock, how):
            if sock is conn.raw_sock and not injected:
                injected.append(True)
                try:
                    with conn.send_lock:  # a worker's reply, right now
                        conn._send(b"secret disk bytes")
                except transport_mod.ConnectionClosed:
                    pass
            return real_shutdown(sock, how)

        monkeypatch.setattr(socket.socket, "shutdown", shutdown)
        conn.abort("ticket revoked (test)")
        monkeypatch.undo()
        assert injected
        got = b""
        reset = False
        try:
            while True:
                data = client.sock.recv(65536)
                if not data:
                    break
                got += data
        except ssl.SSLError as exc:
            pytest.fail("the client got bytes that are not TLS records: %s" % exc)
        except (ConnectionResetError, socket.timeout):
            reset = True
        # Sent and encrypted; or, when the closing connection was reset (RST: the kernel drops
        # what the client had not read yet, 1 run in ~25 under load), not at all. Never clear.
        assert got == b"secret disk bytes" or (got == b"" and reset), (got, reset)
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize("option", ["go", "export_name"])
def test_ticket_revoked_while_its_export_opens_refuses_the_connection(tmp_path, option):
    """A ticket revoked while a connection's handshake is opening its export (the chain opens, SM
    locks): the revocation used to miss that connection (it named its ticket only once the export
    was open), which then served the disk on a revoked ticket. Forced interleaving: the export's
    open waits until the test has revoked the ticket."""
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(range(256)) * 16)
    store = TicketStore()
    opening, go_on = threading.Event(), threading.Event()
    exports = []

    def open_export(ticket):
        opening.set()
        assert go_on.wait(30)
        e = FakeExport(str(path))
        exports.append(e)
        return e

    server = NBDServer(store, open_export, port=0, tls_mode="off", counters=Counters()).start()
    tid = store.create("fake-vdi").id
    client = Raw(Address(server), timeout=10)
    result = []

    def handshake():
        try:
            client.greet()
            if option == "go":
                result.append(client.go(tid))
            else:
                client.option(1, tid.encode())  # EXPORT_NAME: the size and flags, or a close
                result.append(client.recv_exact(10))
        except (EOFError, OSError) as exc:
            result.append(exc)

    t = threading.Thread(target=handshake, daemon=True)
    try:
        t.start()
        assert opening.wait(30)
        store.revoke(tid)
        go_on.set()
        t.join(30)
        assert result, "no answer to the handshake"
        (answer,) = result
        if option == "go":
            if not isinstance(answer, Exception):
                rtype, msg = answer[-1]
                assert rtype == 0x80000006, answer  # NBD_REP_ERR_UNKNOWN
                assert b"revoked" in msg
        else:
            assert isinstance(answer, (EOFError, ConnectionResetError)), answer
        # nothing was served on the revoked ticket; once the client is gone, all is given back
        client.close()
        deadline = time.monotonic() + 10
        while server.connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections() == []
        assert store.list()[0].connections == 0
        assert len(exports) <= 1 and all(e.closed for e in exports)
    finally:
        go_on.set()
        client.close()
        server.stop()


def test_admin_client_thread_that_cannot_start_is_closed_and_accepting_goes_on(
    tmp_path, monkeypatch
):
    """The admin socket (the plugin's way in): a client whose thread cannot start is closed,
    and the next client is served; before, the accept thread died and the agent could never
    create a ticket again."""
    from agent import tickets as tickets_mod

    n = [1]

    class Thread(threading.Thread):
        def start(self):
            if self.name == "admin-client" and n[0] > 0:
                n[0] -= 1
                raise RuntimeError("can't start new thread")
            return super().start()

    fake = types.SimpleNamespace(**vars(threading))
    fake.Thread = Thread
    monkeypatch.setattr(tickets_mod, "threading", fake)
    path = str(tmp_path / "admin.sock")
    admin = tickets_mod.AdminServer(path, lambda req: {"pong": req.get("op")}).start()
    try:
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.settimeout(10)
        first.connect(path)
        try:
            assert first.recv(1) == b""  # closed by the server, nothing answered
        finally:
            first.close()
        assert tickets_mod.admin_call(path, {"op": "ping"}, timeout=10).get("pong") == "ping"
    finally:
        admin.stop()
