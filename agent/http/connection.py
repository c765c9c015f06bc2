"""One client connection after accept and TLS: read request heads, answer them, keep alive or close.

server.HttpServer hands each accepted socket to Connection.run() in its own thread. The loop reads
a request head with protocol.RequestParser under the connection bounds of limits.Limits (the whole
head within header_timeout, idle_timeout between keep-alive requests, max_requests_per_connection),
gives it to routing.Handler with a response.Response, and maps what comes back: an HttpError before
the head is a JSON error, after the head (mid-stream) or ClientGone it ends the connection. Between
keep-alive requests the connection keeps the ticket's last export open (cached_export /
keep_export), for at most EXPORT_LINGER seconds of idleness, so a client doing many Range reads
does not reopen the VHD chain each time.
"""

import logging
import select
import socket
import ssl
import time

from agent.http import protocol as hp
from agent.http.gate import ticket_attr
from agent.http.response import ClientGone, Response
from agent.http.routing import Handler
from agent.tickets import log_id

log = logging.getLogger("fastpath.http")

EXPORT_LINGER = 2.0  # seconds a keep-alive connection keeps its export open while idle


def peer_name(peer):
    """host:port of a peer address, for logs."""
    try:
        return "%s:%s" % (peer[0], peer[1])
    except (TypeError, IndexError):
        return str(peer)


class Connection(object):
    """Reads requests from one client and answers them, until close, error or idle timeout."""

    def __init__(self, server, sock, peer, slot=None):
        self.server = server
        self.slot = slot  # agent.slots.Slot: evictable while waiting, pre-ticket until a ticket
        self.sock = sock
        self.peer = peer
        self.limits = server.limits
        self.parser = hp.RequestParser(self.limits)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._export = None  # (ticket id, export, view) kept between keep-alive requests
        self.last_request = False  # the per-connection request cap is reached: announce the close

    def authenticated(self):
        """The client presented a valid ticket: normal timeouts, out of the pre-ticket budget."""
        if self.slot is not None and not self.slot.authenticated:
            self.server.slots.authenticate(self.slot)

    def _limit(self, value):
        """value, or the shorter pre-ticket timeout while no ticket was presented."""
        if self.slot is not None and not self.slot.authenticated:
            return min(value, self.limits.unauthenticated_timeout)
        return value

    def _waiting(self, waiting):
        """False when the server evicted this (idle) connection: end it."""
        if self.slot is None:
            return True
        return self.server.slots.set_waiting(self.slot, waiting)

    def cached_export(self, ticket):
        """(export, view) kept from the previous request on this ticket, or (None, None)."""
        kept = self._export
        if kept is not None and kept[0] == ticket_attr(ticket, "id", None):
            return kept[1], kept[2]
        self.drop_export()
        return None, None

    def keep_export(self, ticket, export, view, reuse):
        if reuse and getattr(self.server.exports_opener, "release", None) is None:
            self._export = (ticket_attr(ticket, "id", None), export, view)
        else:
            self._export = (None, export, view)
            self.drop_export()

    def _readable(self, timeout):
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        try:
            r, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError):
            return True  # let recv() report what happened
        return bool(r)

    def drop_export(self):
        kept, self._export = self._export, None
        if kept is None:
            return
        export = kept[1]
        self.server.metrics.gauge("open_exports", -1)
        release = getattr(self.server.exports_opener, "release", None)
        try:
            if release is not None:
                release(export)  # the opener shares exports between connections
            elif getattr(export, "close", None) is not None:
                export.close()
        except Exception:
            log.exception("http: closing an export failed")

    def run(self):
        try:
            served = 0
            while not self.server._stopping.is_set():
                if not self._waiting(True):
                    return
                req = self._read_request(first=(served == 0))
                if req is None or not self._waiting(False):
                    return
                served += 1
                self.last_request = served >= self.limits.max_requests_per_connection
                keep = self._handle(req)
                if not keep or served >= self.limits.max_requests_per_connection:
                    return
        finally:
            self.drop_export()

    def _read_request(self, first):
        """The next request head, or None when the client went away or timed out."""
        limits = self.limits
        if self.parser.buffered:
            try:
                req = self.parser.feed(b"")
            except hp.ProtocolError as exc:
                self._protocol_error(exc)
                return None
            if req is not None:
                return req
        # Between requests the client may idle; once a request starts, the whole head must arrive
        # within header_timeout (slowloris).
        deadline = None
        if first or self.parser.buffered:
            deadline = time.time() + self._limit(limits.header_timeout)
        else:
            if self._export is not None and not self._readable(EXPORT_LINGER):
                self.drop_export()  # an idle client must not keep chain files (and locks) held
            self.sock.settimeout(self._limit(limits.idle_timeout))
        while True:
            if deadline is not None:
                left = deadline - time.time()
                if left <= 0:
                    return self._timeout()
                self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                if deadline is None:
                    return None  # idle keep-alive connection: close quietly
                return self._timeout()
            except (OSError, ssl.SSLError):
                return None
            if not data:
                return None
            if deadline is None:
                deadline = time.time() + self._limit(limits.header_timeout)
            try:
                req = self.parser.feed(data)
            except hp.ProtocolError as exc:
                self._protocol_error(exc)
                return None
            if req is not None:
                return req

    def _timeout(self):
        self.server.metrics.add("errors", "timeout")
        err = hp.ProtocolError("request head not received in time", status=408, code="timeout")
        self._protocol_error(err, log_level=logging.INFO)
        return None

    def _protocol_error(self, exc, log_level=logging.INFO):
        self.server.metrics.add("errors", "protocol")
        log.log(log_level, "http %s: %s", peer_name(self.peer), exc.message)
        resp = Response(self, None)
        try:
            resp.send_error(exc, close=True)
        except (OSError, ClientGone, ssl.SSLError):
            pass

    def _handle(self, req):
        resp = Response(self, req)
        started = time.time()
        try:
            return self._handle_in(req, resp, started)
        finally:
            if resp.corked:
                resp.cork(False)

    def _handle_in(self, req, resp, started):
        try:
            handler = Handler(self.server, self, req, resp)
            handler.dispatch()
        except hp.HttpError as exc:
            if resp.head_sent:
                log.info(
                    "http %s: %s failed mid-stream: %s", peer_name(self.peer), _safe_path(req), exc
                )
                self.server.metrics.add("errors", "stream")
                return False
            resp.send_error(exc)
        except ClientGone as exc:
            self.server.metrics.add("errors", "client_disconnect")
            log.info(
                "http %s: client gone during %s: %s", peer_name(self.peer), _safe_path(req), exc
            )
            return False
        except (OSError, ssl.SSLError) as exc:
            if resp.head_sent:
                self.server.metrics.add("errors", "stream")
                log.warning(
                    "http %s: %s failed mid-stream: %s", peer_name(self.peer), _safe_path(req), exc
                )
                return False
            self.server.metrics.add("errors", "internal")
            log.warning("http %s: %s failed: %s", peer_name(self.peer), _safe_path(req), exc)
            resp.send_error(
                hp.HttpError("I/O error while serving the request", status=500, code="io_error")
            )
        except Exception:
            self.server.metrics.add("errors", "internal")
            log.exception("http %s: internal error on %s", peer_name(self.peer), _safe_path(req))
            if resp.head_sent:
                return False
            resp.send_error(hp.HttpError("internal error (see the agent's log)"))
        log.info(
            "http %s: %s %s -> %d, %d bytes, %.3fs",
            peer_name(self.peer),
            req.method,
            _safe_path(req),
            resp.status or 0,
            resp.body_sent,
            time.time() - started,
        )
        return resp.keep_alive and not resp.close_after


def _safe_path(req):
    """The request path with the ticket masked, for logs."""
    parts = req.raw_path.split("/")
    if len(parts) > 3 and parts[1] == "v1" and parts[2] == "exports" and parts[3] not in ("", "-"):
        parts[3] = log_id(parts[3])
    return "/".join(parts)
