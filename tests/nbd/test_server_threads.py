"""agent.nbd.server when a connection's thread cannot be started (RuntimeError "can't start new
thread": the process is out of threads or memory). The accepted connection must be closed and its
slot given back, and the server must go on accepting: before, the exception killed the accept
thread (the server never accepted again) and the connection stayed counted for good."""

import threading
import types

import pytest

from agent.export import Counters
from agent.nbd import server as server_mod
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
