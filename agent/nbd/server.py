"""NBD server: the listener, its limits, and the exports shared by connections.

What lives here: NBDServer (bind, accept loop, max_connections, per-connection thread start, stop,
stats, aborting the connections of a revoked ticket) and ExportCache (exports opened once per
ticket and shared by its connections). Each client is an agent.nbd.connection.Connection in a
thread of its own; agent.nbd.transport moves its bytes; agent.nbd.protocol is the sans-IO state
machine and agent.nbd.wire the numbers and reply bytes.

Threads, not asyncio: dom0's Python 3.6 asyncio cannot upgrade a connection to TLS in place
(STARTTLS), and os.sendfile / os.pread release the GIL, so threads keep the socket and the page cache
busy. Per connection: one reader thread (handshake, then parsing requests), a small bounded worker
pool so several requests are in flight, and a send lock so reply frames never interleave.
"""

import logging
import select
import socket
import threading
import time

from agent.export import Counters
from agent.nbd import wire as w
from agent.nbd.connection import Connection, peer_name
from agent.slots import Budget, Slots
from agent.tickets import log_id

log = logging.getLogger("fastpath.nbd")

DEFAULT_PORT = 10810


class ExportCache(object):
    """Exports opened once per ticket and shared by its connections (refcounted)."""

    def __init__(self, open_export):
        self._open = open_export  # open_export(ticket) -> Export
        self._lock = threading.Lock()
        self._entries = {}  # ticket id -> [export, refs, opening lock]

    def acquire(self, ticket):
        with self._lock:
            entry = self._entries.get(ticket.id)
            if entry is None:
                entry = [None, 0, threading.Lock()]
                self._entries[ticket.id] = entry
            entry[1] += 1
        try:
            with entry[2]:
                if entry[0] is None:
                    entry[0] = self._open(ticket)
            return entry[0]
        except BaseException:
            self.release(ticket.id)
            raise

    def release(self, ticket_id):
        export = None
        with self._lock:
            entry = self._entries.get(ticket_id)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._entries[ticket_id]
                export = entry[0]
        if export is not None:
            export.close()

    def __len__(self):
        with self._lock:
            return len(self._entries)


class NBDServer(object):
    def __init__(
        self,
        tickets,
        open_export,
        host="127.0.0.1",
        port=DEFAULT_PORT,
        tls_mode="require",
        ssl_context=None,
        counters=None,
        max_connections=256,
        max_inflight=32,
        workers=4,
        max_request_length=w.MAX_REQUEST_LENGTH,
        handshake_timeout=10.0,
        idle_timeout=300.0,
        send_timeout=60.0,
        list_exports=False,
        max_descriptors=8192,
        max_handshakes=64,
        max_handshakes_per_address=16,
    ):
        if tls_mode not in w.TLS_MODES:
            raise ValueError("tls_mode must be one of %s" % (w.TLS_MODES,))
        if tls_mode != "off" and ssl_context is None:
            raise ValueError("tls_mode %r needs an ssl_context (cert and key)" % tls_mode)
        self.tickets = tickets
        self.exports = ExportCache(open_export)
        self.host = host
        self.port = port
        self.tls_mode = tls_mode
        self.ssl_context = ssl_context
        self.counters = counters if counters is not None else Counters()
        self.max_connections = max_connections
        self.max_inflight = max_inflight
        self.workers = workers
        self.max_request_length = max_request_length
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.list_exports = list_exports
        self.max_descriptors = max_descriptors  # per BLOCK_STATUS reply and context
        self._sock = None
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()
        self._conns = set()
        # Connections still in their handshake (no ticket yet) have a budget of their own, overall
        # and per address; a newcomer over it displaces the oldest of them (agent.slots). Clients
        # in transmission are never displaced.
        self.slots = Slots(
            Budget(
                max_connections,
                max_handshakes,
                max_handshakes_per_address,
                evict_idle_authenticated=False,
            )
        )
        self._next_id = 0
        tickets.add_listener(self._ticket_gone)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self):
        infos = socket.getaddrinfo(
            self.host, self.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._thread.start()
        log.info(
            "nbd: listening on %s:%d (tls %s)", self.address[0], self.address[1], self.tls_mode
        )
        return self

    @property
    def address(self):
        return self._sock.getsockname()[:2]

    def stop(self):
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        for c in self.connections():
            c.abort("server stopping")
        deadline = time.time() + 10
        while self.connections() and time.time() < deadline:
            time.sleep(0.05)

    def connections(self):
        with self._lock:
            return list(self._conns)

    def stats(self):
        out = self.counters.snapshot()
        out["open_connections"] = len(self.connections())
        out["open_exports"] = len(self.exports)
        return out

    def _ticket_gone(self, ticket):
        for c in self.connections():
            if c.ticket_id == ticket.id:
                c.abort("ticket %s revoked or expired" % log_id(ticket.id))

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self._sock], [], [], 0.5)
                if not r:
                    continue
                client, addr = self._sock.accept()
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                log.exception("nbd: accept failed")
                time.sleep(0.1)
                continue
            with self._lock:
                self._next_id += 1
                conn = Connection(self, client, addr, self._next_id)
            slot, victims = self.slots.admit(addr[0] if isinstance(addr, tuple) else addr, conn)
            for victim in victims:
                self.counters.add("displaced_handshakes")
                victim.conn.abort("displaced: too many connections without a ticket")
            if slot is None:
                log.warning(
                    "nbd: refused %s: %d connections already", peer_name(addr), self.max_connections
                )
                self.counters.add("refused_connections")
                client.close()
                continue
            conn.slot = slot
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=conn.run, name="nbd-conn-%d" % conn.id, daemon=True)
            try:
                t.start()
            except RuntimeError as exc:
                # Out of threads/memory: give the slot back and go on accepting (an exception
                # here used to end the accept thread and leave the connection counted forever).
                log.error("nbd: refused %s: cannot start its thread: %s", peer_name(addr), exc)
                self._forget(conn)
                self.counters.add("refused_connections")
                client.close()
                continue
            self.counters.add("connections")

    def _forget(self, conn):
        with self._lock:
            self._conns.discard(conn)
        if getattr(conn, "slot", None) is not None:
            self.slots.release(conn.slot)
