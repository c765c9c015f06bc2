"""The HTTP API's listening side: HttpServer (listen, accept, connection slots, TLS, stop).

A thread per connection (like the NBD server), its slot given by agent.slots at accept: a newcomer
over a budget (max_connections, the pre-ticket ones overall and per address) displaces the oldest
idle connection, and is refused (503 in plaintext, a close under TLS) only when every connection is
busy. A thread that cannot start gives its slot back; the accept loop goes on. Each accepted socket is negotiated here (plaintext or TLS by its first byte, per tls_mode;
the handshake within Limits.header_timeout) and then served by connection.Connection in its own
thread. stop() shuts every connection's socket down and waits (up to its timeout) for them to end.

This is the first of the rooms a request walks through (agent/http/__init__.py has the map):
server.py -> connection.py -> routing.py -> views.py -> response.py. See docs/http.md.

The daemon starts it as::

    server = HttpServer(("0.0.0.0", 8843), tickets, exports_opener, tls_context=ctx, tls_mode="require")
    server.start()
    ...
    server.stop()

`tickets` resolves a ticket id (see gate.TicketGate), `exports_opener(ticket)` returns the ticket's
export (agent.export.Export or anything exportview.export_view() understands).
"""

import errno
import logging
import socket
import ssl
import threading
import time

from agent.http import protocol as hp
from agent.http.connection import Connection, peer_name
from agent.http.gate import TicketGate
from agent.http.limits import Limits
from agent.http.metrics import HttpMetrics
from agent.http.response import ClientGone
from agent.slots import Slots

log = logging.getLogger("fastpath.http")


class HttpServer(object):
    """Serves the HTTP API on one listening socket, a thread per client connection.

    listen: (host, port) or "host:port" (port 0 = ephemeral; see .address after start()).
    tls_mode: "off" (plaintext only), "optional" (TLS when the client starts with a TLS handshake),
    "require" (plaintext requests get 400 tls_required and are closed). A TLS mode needs tls_context.
    metrics_extra: optional callable returning more Prometheus text (e.g. the NBD server's counters).
    """

    def __init__(
        self,
        listen,
        tickets,
        exports_opener,
        tls_context=None,
        tls_mode=None,
        limits=None,
        metrics_extra=None,
        open_exports=None,
        server_name="fastpath-agent",
    ):
        if isinstance(listen, str):
            host, _, port = listen.rpartition(":")
            listen = (host.strip("[]") or "0.0.0.0", int(port))
        self.listen = listen
        self.gate = TicketGate(tickets)
        self.tickets = tickets
        self.exports_opener = exports_opener
        self.tls_context = tls_context
        if tls_mode is None:
            tls_mode = "require" if tls_context is not None else "off"
        if tls_mode not in ("off", "optional", "require"):
            raise ValueError("tls_mode must be off, optional or require, not %r" % tls_mode)
        if tls_mode != "off" and tls_context is None:
            raise ValueError("tls_mode %s needs a tls_context" % tls_mode)
        self.tls_mode = tls_mode
        self.limits = limits or Limits()
        self.metrics = HttpMetrics()
        self.metrics_extra = metrics_extra
        self.open_exports = open_exports
        self.server_name = server_name
        self._sock = None
        self._thread = None
        self._stopping = threading.Event()
        self._conns = set()
        self._conns_lock = threading.Lock()
        self.slots = Slots(self.limits.budget())

    # -- lifecycle --

    @property
    def address(self):
        return self._sock.getsockname()[:2] if self._sock is not None else None

    def start(self):
        host = self.listen[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(tuple(self.listen))
            sock.listen(128)
        except Exception:
            sock.close()
            raise
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="http-accept", daemon=True)
        self._thread.start()
        log.info(
            "http: listening on %s:%d (tls %s)", self.address[0], self.address[1], self.tls_mode
        )
        return self

    def stop(self, timeout=5.0):
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                # The plain socket's shutdown, also for a TLS connection: SSLSocket.shutdown()
                # drops the TLS object first, and a thread sending at that moment would write
                # disk bytes in clear text (see agent/nbd/server.py Connection.abort).
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._conns_lock:
                if not self._conns:
                    break
            time.sleep(0.02)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                conn, peer = self._sock.accept()
                _nodelay(conn)
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("http: accept failed: %s", exc)
                    self.metrics.add("errors", "accept")
                    time.sleep(0.1)
                    continue
                log.error("http: accept failed: %s", exc)
                continue
            slot, victims = self.slots.admit(peer[0] if isinstance(peer, tuple) else peer, conn)
            for victim in victims:
                self.metrics.add("errors", "evicted")
                _shutdown(victim.conn)  # its thread sees EOF, closes and frees what it held
            if slot is None:
                self.metrics.gauge("connections_rejected", 1)
                self._refuse_busy(conn)
                continue
            self.metrics.gauge("connections_total", 1)
            self.metrics.gauge("connections_open", 1)
            with self._conns_lock:
                self._conns.add(conn)
            t = threading.Thread(
                target=self._serve_connection,
                args=(conn, peer, slot),
                name="http-conn",
                daemon=True,
            )
            try:
                t.start()
            except RuntimeError as exc:
                # Out of threads or memory: give the slot back and go on accepting.
                log.error("http %s: refused, cannot start a thread: %s", peer_name(peer), exc)
                self.metrics.add("errors", "thread_start")
                with self._conns_lock:
                    self._conns.discard(conn)
                self.metrics.gauge("connections_open", -1)
                self.slots.release(slot)
                conn.close()

    def _refuse_busy(self, conn):
        # The client may be speaking TLS: a plaintext answer would be noise. Answer plaintext only
        # when TLS is off, else just close.
        try:
            if self.tls_mode == "off":
                conn.settimeout(1.0)
                err = hp.HttpError("too many connections", status=503, code="too_many_connections")
                body = err.body()
                conn.sendall(
                    hp.response_head(
                        503,
                        [
                            ("Content-Type", hp.JSON_TYPE),
                            ("Content-Length", len(body)),
                            ("Retry-After", "1"),
                            ("Connection", "close"),
                        ],
                    )
                    + body
                )
        except OSError:
            pass
        finally:
            conn.close()

    # -- one connection --

    def _serve_connection(self, raw, peer, slot=None):
        conn = raw
        try:
            conn = self._negotiate(raw, peer, slot)
            if conn is not None:
                Connection(self, conn, peer, slot).run()
        except (OSError, ssl.SSLError, ClientGone) as exc:
            self.metrics.add("errors", "connection")
            log.info("http %s: connection ended: %s", peer_name(peer), exc)
        except Exception:
            self.metrics.add("errors", "internal")
            log.exception("http %s: internal error", peer_name(peer))
        finally:
            try:
                (conn or raw).close()
            except OSError:
                pass
            if conn is not raw:
                raw.close()
            with self._conns_lock:
                self._conns.discard(raw)
                self._conns.discard(conn)
            self.metrics.gauge("connections_open", -1)
            if slot is not None:
                self.slots.release(slot)

    def _negotiate(self, raw, peer, slot=None):
        """Plaintext or TLS, according to tls_mode and the client's first byte."""
        if self.tls_mode == "off":
            return raw
        # Nobody has presented a ticket yet: the short pre-ticket timeout bounds the first byte
        # and the TLS handshake.
        first_timeout = min(self.limits.header_timeout, self.limits.unauthenticated_timeout)
        raw.settimeout(first_timeout)
        try:
            first = raw.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            self.metrics.add("errors", "timeout")
            return None
        if not first:
            return None
        if first == b"\x16":  # a TLS handshake record
            tls = self.tls_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            if slot is not None:
                slot.conn = tls  # raw is detached now: an eviction shuts this one down
            tls.settimeout(first_timeout)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError, socket.timeout) as exc:
                self.metrics.add("errors", "tls_handshake")
                log.info("http %s: TLS handshake failed: %s", peer_name(peer), exc)
                return None
            with self._conns_lock:  # stop() must shut down the TLS socket (raw is detached)
                self._conns.discard(raw)
                self._conns.add(tls)
            return tls
        if self.tls_mode == "optional":
            return raw
        # TLS required and the client speaks plaintext: tell it so, once, and close.
        err = hp.HttpError(
            "this agent serves HTTPS only (TLS is required)", status=400, code="tls_required"
        )
        body = err.body()
        self.metrics.add("requests", 400)
        self.metrics.add("errors", "tls_required")
        try:
            raw.sendall(
                hp.response_head(
                    400,
                    [
                        ("Content-Type", hp.JSON_TYPE),
                        ("Content-Length", len(body)),
                        ("Connection", "close"),
                    ],
                )
                + body
            )
            # Let the client read the answer before the close resets the connection.
            raw.shutdown(socket.SHUT_WR)
            _drain(raw, 0.5)
        except OSError:
            pass
        return None


def _shutdown(sock):
    """Shut a connection's socket down from another thread (plain shutdown, also under TLS: see
    stop())."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError):
        pass


def _nodelay(sock):
    """Small writes (JSON answers, the tail of a stream) must not wait for the peer's delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _drain(sock, seconds):
    """Read and discard until EOF, for at most `seconds` in total."""
    deadline = time.time() + seconds
    try:
        while True:
            left = deadline - time.time()
            if left <= 0:
                break
            sock.settimeout(left)
            if not sock.recv(65536):
                break
    except OSError:
        pass
