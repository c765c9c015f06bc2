"""The agent's HTTP API: export info, extents, and the vhd / raw / blocks streams; health and metrics.

A thread per connection (like the NBD server), bounded by Limits.max_connections; the request parsing
and the framing live in agent.http.protocol (sans-IO), this module only moves bytes. See docs/http.md.

The daemon starts it as::

    server = HttpServer(("0.0.0.0", 8843), tickets, exports_opener, tls_context=ctx, tls_mode="require")
    server.start()
    ...
    server.stop()

`tickets` resolves a ticket id (see `_TicketGate`), `exports_opener(ticket)` returns the ticket's export
(agent.export.Export or anything `export_view()` understands).
"""

import errno
import logging
import os
import re
import select
import socket
import ssl
import threading
import time

from agent.http import protocol as hp

log = logging.getLogger("fastpath.http")

TICKET_RE = re.compile(r"^[A-Za-z0-9_\-]{8,128}$")
ZERO_CHUNK = bytes(1 << 20)
_ZERO_VIEW = memoryview(ZERO_CHUNK)
JSON_TYPE = "application/json"
STREAM_TYPE = "application/octet-stream"
EXPORT_LINGER = 2.0  # seconds a keep-alive connection keeps its export open while idle


class ClientGone(Exception):
    """The client closed or stalled the connection while we were sending."""


# ------------------------------------------------------------------------------------- metrics


class HttpMetrics(object):
    """Counters for /metrics (Prometheus text format). Thread-safe; cheap increments."""

    TRANSPORTS = ("vhd", "raw", "blocks", "json", "metrics")

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes_sent = dict.fromkeys(self.TRANSPORTS, 0)
        self.requests = {}  # status -> count
        self.errors = {}  # kind -> count
        self.blocks = {"sendfile": 0, "pread": 0, "assembled": 0, "zero": 0}
        self.connections_open = 0
        self.connections_total = 0
        self.connections_rejected = 0
        self.open_exports = 0

    def add(self, table, key, n=1):
        with self._lock:
            d = getattr(self, table)
            d[key] = d.get(key, 0) + n

    def gauge(self, name, delta):
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def render(self, extra=None):
        with self._lock:
            lines = []

            def metric(name, kind, help_text, samples):
                lines.append("# HELP %s %s" % (name, help_text))
                lines.append("# TYPE %s %s" % (name, kind))
                for labels, value in samples:
                    if labels:
                        lab = ",".join('%s="%s"' % kv for kv in labels)
                        lines.append("%s{%s} %d" % (name, lab, value))
                    else:
                        lines.append("%s %d" % (name, value))

            metric(
                "fastpath_http_bytes_sent_total",
                "counter",
                "Response body bytes sent, by transport.",
                [((("transport", t),), v) for t, v in sorted(self.bytes_sent.items())],
            )
            metric(
                "fastpath_http_requests_total",
                "counter",
                "HTTP requests answered, by status code.",
                [((("status", str(s)),), v) for s, v in sorted(self.requests.items())],
            )
            metric(
                "fastpath_http_errors_total",
                "counter",
                "Errors, by kind (client protocol errors, disconnects, internal errors).",
                [((("kind", k),), v) for k, v in sorted(self.errors.items())],
            )
            metric(
                "fastpath_http_blocks_total",
                "counter",
                "Blocks sent in streams, by path: sendfile (zero-copy), pread (whole block, TLS), assembled in memory, zero.",
                [((("path", k),), v) for k, v in sorted(self.blocks.items())],
            )
            metric(
                "fastpath_http_open_exports",
                "gauge",
                "Exports held open by HTTP requests right now.",
                [((), self.open_exports)],
            )
            metric(
                "fastpath_http_connections_open",
                "gauge",
                "Client connections open right now.",
                [((), self.connections_open)],
            )
            metric(
                "fastpath_http_connections_total",
                "counter",
                "Client connections accepted.",
                [((), self.connections_total)],
            )
            metric(
                "fastpath_http_connections_rejected_total",
                "counter",
                "Client connections refused because max_connections was reached.",
                [((), self.connections_rejected)],
            )
        text = "\n".join(lines) + "\n"
        if extra is not None:
            try:
                more = extra()
            except Exception:  # a broken hook must not break /metrics
                log.exception("metrics hook failed")
                more = ""
            if more:
                text += more if more.endswith("\n") else more + "\n"
        return text


_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_lines(prefix, values, kind="gauge"):
    """Prometheus text for a flat dict of numbers (e.g. NBDServer.stats(), Counters.snapshot()),
    one untyped-help metric per key: <prefix>_<key>. Non-numeric values are skipped. For
    HttpServer(metrics_extra=lambda: prometheus_lines("fastpath_nbd", nbd.stats()) + ...)."""
    lines = []
    for key in sorted(values):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "%s_%s" % (prefix, _METRIC_NAME.sub("_", str(key)))
        lines.append("# TYPE %s %s" % (name, kind))
        lines.append("%s %s" % (name, repr(value) if isinstance(value, float) else value))
    return "\n".join(lines) + ("\n" if lines else "")


# ------------------------------------------------------------------------------- export views


class ExportView(object):
    """What the HTTP handlers need from an export; see export_view() for the adapter.

    Block-level pieces are tuples: ("file", fd, offset, length) to send with sendfile/pread,
    ("bytes", data) already in memory, ("zero", length) zeros.
    """

    size = 0
    block_size = 2 << 20
    vdi = None
    base_vdi = None
    chain_uuids = ()
    base_uuids = ()

    @property
    def block_count(self):
        return (self.size + self.block_size - 1) // self.block_size

    def block_length(self, index):
        return min(self.block_size, self.size - index * self.block_size)

    def allocated_blocks(self):
        raise NotImplementedError

    def changed_blocks(self):
        raise NotImplementedError

    def block_pieces(self, index):
        raise NotImplementedError

    def read_pieces(self, offset, length):
        raise NotImplementedError

    def extents(self, offset, length):
        """[(start, length, zero, hole)] covering [offset, offset + length)."""
        raise NotImplementedError

    def changed_extents(self, offset, length):
        """[(start, length, changed)] covering [offset, offset + length)."""
        out = []
        changed = set(self.changed_blocks())
        bs = self.block_size
        end = offset + length
        pos = offset
        while pos < end:
            i = pos // bs
            nxt = min(end, (i + 1) * bs)
            flag = i in changed
            if out and out[-1][2] == flag and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + nxt - pos, flag)
            else:
                out.append((pos, nxt - pos, flag))
            pos = nxt
        return out

    def vhd_layout(self, block_indexes, delta=False):
        """An addressable VHD stream layout holding these blocks; with delta=True a differencing
        disk whose parent is the ticket's base. Needs: total_length, block_indexes, prefix_bytes(),
        bitmap_bytes(i), suffix_bytes()."""
        raise NotImplementedError

    def check(self):
        """Raise if the export can no longer be served consistently (e.g. chain changed)."""

    def close(self):
        pass


def export_view(export, ticket=None):
    """Adapt the object returned by exports_opener to ExportView (identity when it already is one)."""
    if isinstance(export, ExportView):
        return export
    return RealExportView(export, ticket)


class RealExportView(ExportView):
    """ExportView over agent.export.Export (plan_read pieces, extents, changed, counters)."""

    def __init__(self, export, ticket=None):
        self.export = export
        self.size = export.size
        self.block_size = export.block_size
        self.vdi = _attr(ticket, "vdi", None)
        self.base_vdi = _attr(ticket, "base", None)
        chain = getattr(export, "chain", None)
        base = getattr(export, "base_chain", None)
        self.chain_uuids = tuple(_uuid_str(f) for f in getattr(chain, "files", ()))
        self.base_uuids = tuple(_uuid_str(f) for f in getattr(base, "files", ()))
        if base is None:
            self.base_vdi = None
        self._allocated = None

    def allocated_blocks(self):
        """Blocks some file of the chain holds: from the BATs (metadata only, as the NBD server
        does), or from the export's extents when a level cannot say."""
        if self._allocated is None:
            export = self.export
            if getattr(export, "base_chain", None) is None and hasattr(export, "changed_blocks"):
                self._allocated = list(export.changed_blocks())  # no base: changed == allocated
            else:
                self._allocated = self._bat_union()
        return self._allocated

    def _bat_union(self):
        bs = self.block_size
        count = self.block_count
        blocks = set()
        try:
            for f in self.export.chain.files:
                fbs = f.block_size
                for b in f.allocated_blocks():
                    first = b * fbs // bs
                    last = min(((b + 1) * fbs - 1) // bs, count - 1)
                    blocks.update(range(first, last + 1))
        except AttributeError:
            blocks = set()
            for start, length, kind in self.export.extents(0, self.size):
                if kind == "hole" or length <= 0:
                    continue
                blocks.update(range(start // bs, (start + length - 1) // bs + 1))
        return sorted(b for b in blocks if b < count)

    def changed_blocks(self):
        return self.export.changed_blocks()

    def changed_extents(self, offset, length):
        return self.export.changed(offset, length)

    def extents(self, offset, length):
        return [
            (s, n, k in ("hole", "zero"), k == "hole")
            for s, n, k in self.export.extents(offset, length)
        ]

    def read_pieces(self, offset, length):
        out = []
        for piece in self.export.plan_read(offset, length):
            kind = piece[0]
            if kind == "sendfile":
                out.append(("file", piece[1], piece[2], piece[3]))
            elif kind == "bytes":
                out.append(("bytes", piece[1]))
            elif kind == "hole":
                out.append(("zero", piece[1]))
            else:
                raise ValueError("unknown read piece %r" % (kind,))
        return out

    def block_pieces(self, index):
        start = index * self.block_size
        return self.read_pieces(start, self.block_length(index))

    def record(self, method, nbytes):
        counters = getattr(self.export, "counters", None)
        if counters is not None:
            counters.record(method, nbytes)

    def vhd_layout(self, block_indexes, delta=False):
        from agent.vhd import writer

        chain = self.export.chain
        parent = None
        if delta:
            base = self.export.base_chain
            leaf = base.files[0]
            name = "%s.vhd" % self.base_vdi if self.base_vdi else os.path.basename(leaf.path)
            parent = (leaf.uuid, name)
        return writer.VhdStreamLayout(
            self.size, block_indexes, self.block_size, uuid=chain.files[0].uuid, parent=parent
        )

    def check(self):
        check = getattr(self.export, "check", None)
        if check is not None:
            check()


def _uuid_str(level):
    u = getattr(level, "uuid", None)
    return str(u) if u is not None else None


# -------------------------------------------------------------------------------- the server


class _TicketGate(object):
    """Resolves a ticket id to a ticket object, mapping the store's answers to HTTP errors.

    The store is agent.tickets.TicketStore or anything like it: `get(ticket_id)` returns the ticket or
    raises (TicketError "unknown ticket" / "ticket expired" / "ticket revoked", or KeyError); a ticket
    has `vdi`, `base`, `expires` and `expired` / `revoked` (attributes or methods). When the store has
    `acquire(id)` / `release(id)` they bound the requests running on one ticket (max_connections).
    """

    def __init__(self, store):
        self.store = store

    def lookup(self, ticket_id):
        if not TICKET_RE.match(ticket_id or ""):
            raise hp.RequestError("invalid ticket", status=403, code="invalid_ticket")
        getter = getattr(self.store, "lookup", None) or self.store.get
        try:
            ticket = getter(ticket_id)
        except KeyError:
            ticket = None
        except Exception as exc:  # the store's own typed errors: expired, revoked, unknown
            raise _map_ticket_error(exc) from None
        if ticket is None:
            raise hp.RequestError("invalid ticket", status=403, code="invalid_ticket")
        if _flag(ticket, "revoked"):
            raise hp.RequestError("ticket was revoked", status=410, code="ticket_revoked")
        if _flag(ticket, "expired"):
            raise hp.RequestError("ticket has expired", status=410, code="ticket_expired")
        return ticket

    def still_valid(self, ticket):
        return not (_flag(ticket, "revoked") or _flag(ticket, "expired"))


def _flag(obj, name):
    value = getattr(obj, name, False)
    if callable(value):
        value = value()
    return bool(value)


def _map_ticket_error(exc):
    """The store's refusal (agent.tickets.TicketError or similar) as an HTTP error."""
    text = ("%s %s" % (type(exc).__name__, exc)).lower()
    if "expired" in text:
        return hp.RequestError("ticket has expired", status=410, code="ticket_expired")
    if "revoked" in text:
        return hp.RequestError("ticket was revoked", status=410, code="ticket_revoked")
    if "connections" in text or "busy" in text or "limit" in text:
        return hp.RequestError(
            "ticket has too many connections",
            status=503,
            code="too_many_connections",
            headers=[("Retry-After", "1")],
        )
    if "unknown" in text or "notfound" in text or "invalid" in text or isinstance(exc, KeyError):
        return hp.RequestError("invalid ticket", status=403, code="invalid_ticket")
    log.error("http: ticket check failed: %s", exc)
    return hp.RequestError("ticket check failed", status=500, code="internal_error")


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
        self.gate = _TicketGate(tickets)
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
        self.limits = limits or hp.Limits()
        self.metrics = HttpMetrics()
        self.metrics_extra = metrics_extra
        self.open_exports = open_exports
        self.server_name = server_name
        self._sock = None
        self._thread = None
        self._stopping = threading.Event()
        self._conns = set()
        self._conns_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)

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
            if not self._slots.acquire(blocking=False):
                self.metrics.gauge("connections_rejected", 1)
                self._refuse_busy(conn)
                continue
            self.metrics.gauge("connections_total", 1)
            self.metrics.gauge("connections_open", 1)
            with self._conns_lock:
                self._conns.add(conn)
            t = threading.Thread(
                target=self._serve_connection, args=(conn, peer), name="http-conn", daemon=True
            )
            t.start()

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
                            ("Content-Type", JSON_TYPE),
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

    def _serve_connection(self, raw, peer):
        conn = raw
        try:
            conn = self._negotiate(raw, peer)
            if conn is not None:
                _Connection(self, conn, peer).run()
        except (OSError, ssl.SSLError, ClientGone) as exc:
            self.metrics.add("errors", "connection")
            log.info("http %s: connection ended: %s", _peer(peer), exc)
        except Exception:
            self.metrics.add("errors", "internal")
            log.exception("http %s: internal error", _peer(peer))
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
            self._slots.release()

    def _negotiate(self, raw, peer):
        """Plaintext or TLS, according to tls_mode and the client's first byte."""
        if self.tls_mode == "off":
            return raw
        raw.settimeout(self.limits.header_timeout)
        try:
            first = raw.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            self.metrics.add("errors", "timeout")
            return None
        if not first:
            return None
        if first == b"\x16":  # a TLS handshake record
            tls = self.tls_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            tls.settimeout(self.limits.header_timeout)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError, socket.timeout) as exc:
                self.metrics.add("errors", "tls_handshake")
                log.info("http %s: TLS handshake failed: %s", _peer(peer), exc)
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
                        ("Content-Type", JSON_TYPE),
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


def _peer(peer):
    try:
        return "%s:%s" % (peer[0], peer[1])
    except (TypeError, IndexError):
        return str(peer)


class _Connection(object):
    """Reads requests from one client and answers them, until close, error or idle timeout."""

    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.limits = server.limits
        self.parser = hp.RequestParser(self.limits)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._export = None  # (ticket id, export, view) kept between keep-alive requests
        self.last_request = False  # the per-connection request cap is reached: announce the close

    def cached_export(self, ticket):
        """(export, view) kept from the previous request on this ticket, or (None, None)."""
        kept = self._export
        if kept is not None and kept[0] == _attr(ticket, "id", None):
            return kept[1], kept[2]
        self.drop_export()
        return None, None

    def keep_export(self, ticket, export, view, reuse):
        if reuse and getattr(self.server.exports_opener, "release", None) is None:
            self._export = (_attr(ticket, "id", None), export, view)
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
                req = self._read_request(first=(served == 0))
                if req is None:
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
            deadline = time.time() + limits.header_timeout
        else:
            if self._export is not None and not self._readable(EXPORT_LINGER):
                self.drop_export()  # an idle client must not keep chain files (and locks) held
            self.sock.settimeout(limits.idle_timeout)
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
                deadline = time.time() + limits.header_timeout
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
        log.log(log_level, "http %s: %s", _peer(self.peer), exc.message)
        resp = _Response(self, None)
        try:
            resp.send_error(exc, close=True)
        except (OSError, ClientGone, ssl.SSLError):
            pass

    def _handle(self, req):
        resp = _Response(self, req)
        started = time.time()
        try:
            return self._handle_in(req, resp, started)
        finally:
            if resp.corked:
                resp.cork(False)

    def _handle_in(self, req, resp, started):
        try:
            handler = _Handler(self.server, self, req, resp)
            handler.dispatch()
        except hp.HttpError as exc:
            if resp.head_sent:
                log.info(
                    "http %s: %s failed mid-stream: %s", _peer(self.peer), _safe_path(req), exc
                )
                self.server.metrics.add("errors", "stream")
                return False
            resp.send_error(exc)
        except ClientGone as exc:
            self.server.metrics.add("errors", "client_disconnect")
            log.info("http %s: client gone during %s: %s", _peer(self.peer), _safe_path(req), exc)
            return False
        except (OSError, ssl.SSLError) as exc:
            if resp.head_sent:
                self.server.metrics.add("errors", "stream")
                log.warning(
                    "http %s: %s failed mid-stream: %s", _peer(self.peer), _safe_path(req), exc
                )
                return False
            self.server.metrics.add("errors", "internal")
            log.warning("http %s: %s failed: %s", _peer(self.peer), _safe_path(req), exc)
            resp.send_error(
                hp.HttpError("I/O error while serving the request", status=500, code="io_error")
            )
        except Exception:
            self.server.metrics.add("errors", "internal")
            log.exception("http %s: internal error on %s", _peer(self.peer), _safe_path(req))
            if resp.head_sent:
                return False
            resp.send_error(hp.HttpError("internal error (see the agent's log)"))
        log.info(
            "http %s: %s %s -> %d, %d bytes, %.3fs",
            _peer(self.peer),
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
        parts[3] = parts[3][:4] + "..."
    return "/".join(parts)


class _Response(object):
    """Sends one response: head, then body bytes or file ranges; counts bytes by transport."""

    def __init__(self, conn, req):
        self.conn = conn
        self.sock = conn.sock
        self.req = req
        self.head_sent = False
        self.status = None
        self.body_sent = 0
        self.transport = "json"
        self.keep_alive = req is not None and req.keep_alive and not conn.last_request
        self.close_after = False
        self.head_only = req is not None and req.method == "HEAD"
        self.corked = False
        self.metrics = conn.server.metrics

    def start(self, status, headers, length=None, body=None):
        """Send the head (and a small body with it, in one segment: the socket has TCP_NODELAY)."""
        headers = list(headers)
        headers.append(("Server", self.conn.server.server_name))
        if length is not None:
            headers.append(("Content-Length", length))
        else:
            self.keep_alive = False
        if not self.keep_alive or self.close_after:
            headers.append(("Connection", "close"))
        self.status = status
        self.metrics.add("requests", status)
        head = hp.response_head(status, headers)
        if body and not self.head_only:
            self._send(head + body)
            self.body_sent += len(body)
            self.metrics.add("bytes_sent", self.transport, len(body))
        else:
            self._send(head)
        self.head_sent = True
        if self.transport in ("raw", "vhd", "blocks") and not self.head_only:
            self.cork(True)  # uncorked by _Connection._handle when the response is done
            self.corked = True

    def cork(self, on):
        """TCP_CORK while a stream interleaves small frame headers with sendfile'd blocks, so they
        leave in full segments; uncorking flushes the tail at once. No-op under TLS."""
        if self.conn.tls or not hasattr(socket, "TCP_CORK"):
            return
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
        except OSError:
            pass

    def send_json(self, obj, status=200, headers=()):
        body = hp.json_body(obj)
        self.start(
            status,
            [("Content-Type", JSON_TYPE), ("Cache-Control", "no-store")] + list(headers),
            len(body),
            body,
        )

    def send_error(self, exc, close=False):
        if close:
            self.close_after = True
            self.keep_alive = False
        body = exc.body()
        self.transport = "json"
        self.start(
            exc.status,
            [("Content-Type", JSON_TYPE), ("Cache-Control", "no-store")] + exc.headers,
            len(body),
            body,
        )

    def write(self, data):
        if self.head_only or not data:
            return
        self._send(data)
        self.body_sent += len(data)
        self.metrics.add("bytes_sent", self.transport, len(data))

    def write_zeros(self, length):
        while length > 0:
            n = min(length, len(ZERO_CHUNK))
            self.write(_ZERO_VIEW[:n])
            length -= n

    def write_file(self, fd, offset, length):
        """Send length bytes of fd at offset: sendfile on plaintext sockets, pread under TLS."""
        if self.head_only or length <= 0:
            return
        if self.conn.tls:
            while length > 0:
                n = min(length, 2 << 20)  # a whole block per pread + SSL write
                data = os.pread(fd, n, offset)
                if len(data) != n:
                    raise hp.HttpError(
                        "short read from a chain file at offset %d" % offset, code="io_error"
                    )
                self.write(data)
                offset += n
                length -= n
            return
        self._sendfile(fd, offset, length)

    def _sendfile(self, fd, offset, length):
        sock_fd = self.sock.fileno()
        timeout = self.conn.limits.send_timeout
        poller = None
        while length > 0:
            try:
                sent = os.sendfile(sock_fd, fd, offset, length)
            except BlockingIOError:
                sent = None
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ClientGone(str(exc)) from None
            if sent is None:
                if poller is None:
                    poller = select.poll()
                    poller.register(sock_fd, select.POLLOUT)
                if not poller.poll(timeout * 1000):
                    raise ClientGone("send stalled for %ss" % timeout)
                continue
            if sent == 0:
                raise hp.HttpError("chain file ended early at offset %d" % offset, code="io_error")
            offset += sent
            length -= sent
            self.body_sent += sent
            self.metrics.add("bytes_sent", self.transport, sent)

    def _send(self, data):
        self.sock.settimeout(self.conn.limits.send_timeout)
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise ClientGone("send stalled for %ss" % self.conn.limits.send_timeout) from None
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as exc:
            raise ClientGone(str(exc)) from None

    def write_pieces(self, pieces, record=None):
        """Send read pieces; record(method, nbytes) reports what was done (export counters)."""
        for piece in pieces:
            kind = piece[0]
            if kind == "file":
                self.write_file(piece[1], piece[2], piece[3])
                method, n = ("pread" if self.conn.tls else "sendfile"), piece[3]
            elif kind == "bytes":
                self.write(piece[1])
                method, n = "assembled", len(piece[1])
            elif kind == "zero":
                self.write_zeros(piece[1])
                method, n = "hole", piece[1]
            else:
                raise ValueError("unknown piece kind %r" % (kind,))
            if record is not None and not self.head_only:
                record(method, n)


# ------------------------------------------------------------------------------- the handlers


class _Handler(object):
    def __init__(self, server, conn, req, resp):
        self.server = server
        self.conn = conn
        self.req = req
        self.resp = resp

    def dispatch(self):
        req = self.req
        if req.method == "DELETE":
            return self.revoke()
        if req.method not in ("GET", "HEAD"):
            raise hp.RequestError(
                "method %s not allowed" % req.method,
                status=405,
                code="method_not_allowed",
                headers=[("Allow", "GET, HEAD, DELETE" if self._export_root() else "GET, HEAD")],
            )
        path = req.path
        if path == "/healthz":
            return self.resp.send_json({"status": "ok"})
        if path == "/metrics":
            return self.metrics()
        export = self._export_path()
        if export is not None:
            ticket, what = export
            action = {
                "": self.info,
                "extents": self.extents,
                "vhd": self.vhd,
                "raw": self.raw,
                "blocks": self.blocks,
            }.get(what)
            if action is None:
                raise hp.RequestError("no such resource", status=404, code="not_found")
            return self.with_export(ticket, action)
        raise hp.RequestError("no such resource", status=404, code="not_found")

    def _export_path(self):
        """(ticket, sub-resource) of /v1/exports/<ticket>[/<what>][/], what "" for the export
        itself and None for a deeper path; None for a path outside /v1/exports/."""
        parts = self.req.path.split("/")
        if len(parts) < 4 or parts[:3] != ["", "v1", "exports"]:
            return None
        rest = parts[4:]
        if rest and rest[-1] == "":
            rest = rest[:-1]
        if len(rest) > 1:
            return parts[3], None
        return parts[3], rest[0] if rest else ""

    def _export_root(self):
        """The ticket of a path that names an export itself (/v1/exports/<ticket>), else None."""
        export = self._export_path()
        return export[0] if export is not None and export[1] == "" else None

    def revoke(self):
        """DELETE /v1/exports/<ticket>: the ticket's holder ends it (no new connection or request
        is accepted with it; the agent closes its open connections). Holding the ticket already
        grants reading the disk, so it is enough to give it up: a backup client revokes its
        tickets here in one request instead of a plugin call through XAPI. Idempotent: a ticket
        that is already revoked or expired answers the same."""
        in_path = self._export_root()
        if in_path is None:
            raise hp.RequestError(
                "method DELETE not allowed",
                status=405,
                code="method_not_allowed",
                headers=[("Allow", "GET, HEAD")],
            )
        ticket_id = self.ticket_id(in_path)
        try:
            self.server.gate.lookup(ticket_id)
        except hp.RequestError as exc:
            if exc.code not in ("ticket_revoked", "ticket_expired"):
                raise
            return self.resp.send_json({"revoked": True, "already": exc.code})
        revoke = getattr(self.server.tickets, "revoke", None)
        if revoke is None:
            raise hp.RequestError(
                "this server cannot revoke tickets", status=405, code="method_not_allowed"
            )
        try:
            revoke(ticket_id)
        except Exception as exc:
            raise _map_ticket_error(exc) from None
        return self.resp.send_json({"revoked": True})

    def metrics(self):
        text = self.server.metrics.render(self.server.metrics_extra).encode("utf-8")
        self.resp.transport = "metrics"
        self.resp.start(
            200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], len(text), text
        )

    # -- auth --

    def ticket_id(self, in_path):
        auth = self.req.header("authorization")
        bearer = None
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise hp.RequestError(
                    "Authorization must be 'Bearer <ticket>'",
                    status=401,
                    code="unauthorized",
                    headers=[("WWW-Authenticate", 'Bearer realm="fastpath"')],
                )
            bearer = token.strip()
        if in_path in ("", "-"):
            if bearer is None:
                raise hp.RequestError(
                    "a ticket is required (in the path or as Authorization: Bearer)",
                    status=401,
                    code="unauthorized",
                    headers=[("WWW-Authenticate", 'Bearer realm="fastpath"')],
                )
            return bearer
        if bearer is not None and bearer != in_path:
            raise hp.RequestError(
                "the ticket in the path and in Authorization differ",
                status=400,
                code="ticket_mismatch",
            )
        return in_path

    def with_export(self, in_path, action):
        ticket_id = self.ticket_id(in_path)
        gate = self.server.gate
        ticket = gate.lookup(ticket_id)
        want_vdi = self.req.param("vdi")
        if want_vdi is not None and want_vdi.lower() != str(_attr(ticket, "vdi", "")).lower():
            raise hp.RequestError("this ticket is for another VDI", status=403, code="wrong_vdi")
        store = self.server.tickets
        acquire = getattr(store, "acquire", None)
        release = getattr(store, "release", None)
        if acquire is not None:
            try:
                acquire(ticket_id)
            except Exception as exc:
                raise _map_ticket_error(exc) from None
        try:
            self.open_and_run(ticket, action)
        finally:
            if acquire is not None and release is not None:
                release(ticket_id)

    def open_and_run(self, ticket, action):
        # A keep-alive connection keeps its last export open for the next request on the same
        # ticket (clients doing many Range reads would otherwise reopen the chain every time).
        export, view = self.conn.cached_export(ticket)
        if export is None:
            try:
                export = self.server.exports_opener(ticket)
            except hp.HttpError:
                raise
            except Exception as exc:
                log.warning(
                    "http: opening the export of ticket %s failed: %s",
                    _attr(ticket, "id", "?")[:4],
                    exc,
                )
                raise _export_error(exc) from exc
            view = export_view(export, ticket)
            if view.vdi is None:
                view.vdi = _attr(ticket, "vdi", None)
            self.server.metrics.gauge("open_exports", 1)
        self.ticket = ticket
        self.view = view
        ok = False
        try:
            action()
            ok = True
        except (hp.HttpError, ClientGone, OSError):
            raise
        except Exception as exc:
            if not type(exc).__module__.startswith("agent."):
                raise
            # The export's own refusals (agent.export.ChainChanged, ExportError, ...): a clean
            # JSON error before the head, a closed stream after it.
            raise _export_error(exc) from exc
        finally:
            self.conn.keep_export(ticket, export, view, reuse=ok and self.resp.keep_alive)

    def record(self, method, nbytes):
        record = getattr(self.view, "record", None)
        if record is not None:
            record(method, nbytes)

    def check_live(self):
        if not self.server.gate.still_valid(self.ticket):
            raise hp.HttpError("ticket expired or was revoked", status=410, code="ticket_expired")
        if self.server._stopping.is_set():
            raise hp.HttpError("agent is stopping", status=503, code="stopping")
        self.view.check()

    # -- resources --

    def info(self):
        v = self.view
        allocated = v.allocated_blocks()
        info = {
            "ticket": _attr(self.ticket, "id", None),
            "vdi": v.vdi,
            "size": v.size,
            "block_size": v.block_size,
            "block_count": v.block_count,
            "chain": list(v.chain_uuids),
            "depth": len(v.chain_uuids),
            "base": None,
            "allocation": {
                "allocated_blocks": len(allocated),
                "allocated_bytes": sum(v.block_length(i) for i in allocated),
            },
            "transports": ["raw", "vhd", "blocks"],
            "expires": _attr(self.ticket, "expires", None),
        }
        if v.base_vdi is not None or v.base_uuids:
            changed = v.changed_blocks()
            info["base"] = {
                "vdi": v.base_vdi,
                "chain": list(v.base_uuids),
                "changed_blocks": len(changed),
                "changed_bytes": sum(v.block_length(i) for i in changed),
            }
        self.resp.send_json(info)

    def _offset_length(self, size):
        start = _int_param(self.req, "start", 0)
        length = _int_param(self.req, "length", size - start if start <= size else 0)
        if start > size or start + length > size:
            raise hp.RequestError(
                "start/length past the end of the disk (%d bytes)" % size,
                status=416,
                code="range_not_satisfiable",
                headers=[("Content-Range", "bytes */%d" % size)],
            )
        return start, length

    def extents(self):
        v = self.view
        context = self.req.param("context", "allocation")
        start, length = self._offset_length(v.size)
        granularity = self.req.param("granularity", "sector")
        if granularity not in ("sector", "block"):
            raise hp.RequestError("granularity must be sector or block", code="bad_parameter")
        if context == "allocation" and granularity == "block":
            # Whole blocks from the BATs: cheap on any disk size, what a block-level copier needs.
            allocated = set(v.allocated_blocks())
            runs = []
            for s0, n, alloc in _block_runs(start, length, v.block_size, allocated):
                runs.append({"start": s0, "length": n, "zero": not alloc, "hole": not alloc})
        elif context == "allocation":
            runs = [
                {"start": s, "length": n, "zero": bool(z), "hole": bool(h)}
                for s, n, z, h in v.extents(start, length)
            ]
        elif context in ("changed", "dirty"):
            if v.base_vdi is None and not v.base_uuids:
                raise hp.RequestError(
                    "this ticket has no base: no changed blocks to report",
                    status=400,
                    code="no_base",
                )
            runs = [
                {"start": s, "length": n, "changed": bool(c), "dirty": bool(c)}
                for s, n, c in v.changed_extents(start, length)
            ]
        else:
            raise hp.RequestError(
                "unknown extents context %r (allocation or changed)" % context[:32],
                code="bad_context",
            )
        self.resp.send_json(runs)

    def raw(self):
        v = self.view
        rng = hp.parse_range(self.req.header("range"), v.size)
        resp = self.resp
        resp.transport = "raw"
        headers = [("Content-Type", STREAM_TYPE), ("Accept-Ranges", "bytes")]
        if rng is None:
            start, end = 0, v.size
            status = 200
        else:
            start, end = rng
            status = 206
            headers.append(("Content-Range", "bytes %d-%d/%d" % (start, end - 1, v.size)))
        self.check_live()  # a chain already changed gets a JSON error, not a short body
        resp.start(status, headers, end - start)
        if resp.head_only:
            return
        # The ticket and the chain are checked between blocks; the last byte is held back until
        # a final check, so a chain that changed while the data left ends in a short body.
        step = v.block_size
        pos = start
        last = end - 1
        while pos < last:
            self.check_live()
            n = min(step - pos % step, last - pos)
            resp.write_pieces(v.read_pieces(pos, n), self.record)
            pos += n
        if end > start:
            self.check_live()
            resp.write_pieces(v.read_pieces(last, 1), self.record)

    def _block_range(self):
        v = self.view
        first = _int_param(self.req, "start", 0)
        count = _int_param(self.req, "count", max(0, v.block_count - first))
        if first > v.block_count or first + count > v.block_count:
            raise hp.RequestError(
                "block range [%d, +%d) outside the disk's %d blocks"
                % (first, count, v.block_count),
                status=416,
                code="range_not_satisfiable",
            )
        return first, count

    def _pad_to(self, pos, target):
        if target < pos:
            raise hp.HttpError("VHD layout goes backwards at %d (stream at %d)" % (target, pos))
        self.resp.write_zeros(target - pos)
        return target

    def _wants_changed(self):
        flag = self.req.param("changed")
        has_base = self.view.base_vdi is not None or bool(self.view.base_uuids)
        if flag is None:
            return has_base
        if flag not in ("0", "1", "true", "false"):
            raise hp.RequestError("changed must be 0 or 1", code="bad_parameter")
        changed = flag in ("1", "true")
        if changed and not has_base:
            raise hp.RequestError(
                "changed=1 needs a ticket with a base", status=400, code="no_base"
            )
        return changed

    def blocks(self):
        v = self.view
        first, count = self._block_range()
        changed = self._wants_changed()
        chosen = v.changed_blocks() if changed else v.allocated_blocks()
        chosen = [i for i in chosen if first <= i < first + count]
        # A changed block that no file of the chain holds any more reads as zeros: a ZERO frame.
        holes = set(chosen) - set(v.allocated_blocks()) if changed else set()
        plans = [(i, 0 if i in holes else v.block_length(i)) for i in chosen]
        enc = hp.BlocksEncoder(v.size, v.block_size, first, count, changed=changed)
        length = hp.BlocksEncoder.stream_length(n for _, n in plans)
        self.check_live()
        resp = self.resp
        resp.transport = "blocks"
        resp.start(
            200,
            [
                ("Content-Type", "application/x-fastpath-blocks"),
                ("X-Fastpath-Frames", len(plans)),
            ],
            length,
        )
        if resp.head_only:
            return
        resp.write(enc.stream_header())
        metrics = self.server.metrics
        for i, n in plans:
            self.check_live()
            if i in holes:
                resp.write(enc.frame(i, 0, zero=True))
                metrics.add("blocks", "zero")
                continue
            pieces = v.block_pieces(i)
            resp.write(enc.frame(i, n))
            _count_block(metrics, pieces, self.conn.tls)
            resp.write_pieces(pieces, self.record)
        self.check_live()  # a chain change during the last block: no end frame, the client knows
        resp.write(enc.end())

    def vhd(self):
        v = self.view
        changed = self._wants_changed()
        chosen = v.changed_blocks() if changed else v.allocated_blocks()
        layout = v.vhd_layout(chosen, delta=changed)
        resp = self.resp
        resp.transport = "vhd"
        name = "%s%s.vhd" % (v.vdi or "disk", "-delta" if changed else "")
        self.check_live()
        resp.start(
            200,
            [
                ("Content-Type", "application/x-vhd"),
                ("Content-Disposition", 'attachment; filename="%s"' % name),
            ],
            layout.total_length,
        )
        if resp.head_only:
            return
        # Follow the layout's own offsets (it may pad between areas to keep data 4 KiB-aligned).
        prefix = layout.prefix_bytes()
        resp.write(prefix)
        pos = len(prefix)
        metrics = self.server.metrics
        bs = v.block_size
        for i in layout.blocks:
            self.check_live()
            pos = self._pad_to(pos, layout.block_offset(i))
            bitmap = layout.bitmap_bytes(i)
            resp.write(bitmap)
            pos = self._pad_to(pos + len(bitmap), layout.data_offset(i))
            pieces = v.block_pieces(i)
            _count_block(metrics, pieces, self.conn.tls)
            resp.write_pieces(pieces, self.record)
            pos += bs  # with the zeros below for the last block of a disk not block-aligned
            short = bs - v.block_length(i)
            if short:
                resp.write_zeros(short)
        self._pad_to(pos, layout.total_length - len(layout.suffix_bytes()))
        self.check_live()  # the footer only follows data read from an unchanged chain
        resp.write(layout.suffix_bytes())


def _block_runs(offset, length, block_size, members):
    """[(start, length, in members)] at block granularity over [offset, offset + length), merged."""
    out = []
    end = offset + length
    pos = offset
    while pos < end:
        i = pos // block_size
        nxt = min(end, (i + 1) * block_size)
        flag = i in members
        if out and out[-1][2] == flag:
            out[-1] = (out[-1][0], out[-1][1] + nxt - pos, flag)
        else:
            out.append((pos, nxt - pos, flag))
        pos = nxt
    return out


def _count_block(metrics, pieces, tls):
    kinds = {p[0] for p in pieces}
    if kinds == {"file"} and len(pieces) == 1:
        metrics.add("blocks", "pread" if tls else "sendfile")
    elif kinds == {"zero"}:
        metrics.add("blocks", "zero")
    else:
        metrics.add("blocks", "assembled")


def _attr(obj, name, default):
    value = getattr(obj, name, default)
    if isinstance(obj, dict):
        value = obj.get(name, default)
    return value


def _int_param(req, name, default):
    value = req.param(name)
    if value is None:
        return default
    if not value.isdigit() or len(value) > 19:
        raise hp.RequestError("%s must be a non-negative integer" % name, code="bad_parameter")
    return int(value)


def _export_error(exc):
    """Map a failure to open an export to an HTTP error, by the exception's type name."""
    name = type(exc).__name__
    low = name.lower()
    msg = str(exc) or name
    if "notfound" in low or isinstance(exc, FileNotFoundError):
        return hp.HttpError(
            "the ticket's VDI was not found: %s" % msg, status=404, code="vdi_not_found"
        )
    if "unsupported" in low or "format" in low:
        return hp.HttpError(msg, status=409, code="unsupported_format")
    if "changed" in low:
        return hp.HttpError(msg, status=409, code="chain_changed")
    if "busy" in low or "locked" in low:
        return hp.HttpError(
            "the SR is busy, retry: %s" % msg,
            status=503,
            code="sr_busy",
            headers=[("Retry-After", "5")],
        )
    if "corrupt" in low or "vhd" in low:
        return hp.HttpError(
            "the VDI's VHD chain cannot be read: %s" % msg, status=500, code="corrupt_vhd"
        )
    return hp.HttpError("cannot open the export: %s" % name, status=500, code="export_failed")
