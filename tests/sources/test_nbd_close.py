"""orchestrator.sources.nbdclient._close_handle against a server that does not close after
NBD_CMD_DISC. libnbd's nbd_shutdown() sends DISC and then polls without a bound until the server
closes the connection, so such a server (the agent's NBD server, in process, made to hold on to
the connection after DISC) hung every worker's last step and the source's close(). The polite
disconnect still happens with a server that behaves."""

import threading

import pytest

from agent.export import Counters
from agent.nbd import protocol as p
from agent.nbd.server import NBDServer
from agent.tickets import TicketStore
from orchestrator.sources.nbdclient import NbdEndpoint, _close_handle
from tests.nbd.test_server_inproc import FakeExport

pytest.importorskip("nbd", reason="libnbd's Python binding (python3-libnbd) is not installed")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An in-process agent NBD server; `hold` set: it holds every connection open after DISC
    (bounded: 60 s, or until the test ends)."""
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(4096))
    store = TicketStore()
    hold = threading.Event()
    release = threading.Event()
    seen = []
    orig = p.ServerConnection.next_event

    def next_event(self):
        ev = orig(self)
        if isinstance(ev, p.Disconnect):
            seen.append(ev)
            if hold.is_set():
                release.wait(60)
        return ev

    monkeypatch.setattr(p.ServerConnection, "next_event", next_event)
    srv = NBDServer(
        store, lambda ticket: FakeExport(str(path)), port=0, tls_mode="off", counters=Counters()
    ).start()
    endpoint = NbdEndpoint("127.0.0.1", srv.address[1], store.create("fake-vdi").id, timeout=10)
    try:
        yield srv, endpoint, hold, release, seen
    finally:
        release.set()
        srv.stop()


def close_in_thread(h, **kw):
    done = threading.Event()

    def run():
        _close_handle(h, **kw)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)  # a bound for the test only: the fix returns after its own (short) timeout
    return done.is_set()


def test_close_is_bounded_when_the_server_keeps_the_connection_after_disc(server):
    srv, endpoint, hold, release, seen = server
    hold.set()
    h = endpoint.handle()
    assert h.pread(512, 0) == bytes(512)
    assert close_in_thread(h), "close waited for the server to hang up"
    assert not release.is_set()  # it returned while the server still held the connection
    assert len(seen) == 1  # DISC was sent (politely) all the same


def test_close_sends_disc_and_the_server_hangs_up(server):
    srv, endpoint, hold, release, seen = server
    h = endpoint.handle()
    assert h.pread(512, 0) == bytes(512)
    assert close_in_thread(h)
    assert len(seen) == 1
    assert h.aio_is_closed()  # the server closed after DISC, and the client saw it
