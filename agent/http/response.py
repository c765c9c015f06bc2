"""Sending one response: the head, a JSON body, or a stream of file ranges, zeros and frames.

Response is the "streams" room of the HTTP API, the only place where body bytes meet the socket:
write() for bytes, write_file() with sendfile (plaintext) or pread + SSL write (TLS), write_zeros()
from one shared zero buffer, write_pieces() for an ExportView's read pieces (exportview.py), and
TCP_CORK while a stream interleaves frame headers with sendfile'd blocks. Every send is bounded by
Limits.send_timeout; a client that stops reading or goes away raises ClientGone, which
connection.Connection turns into the end of the connection. Bytes sent are counted by transport
in the server's metrics (metrics.py). views.py decides what to send, this module only sends it.
"""

import os
import select
import socket
import ssl

from agent.http import protocol as hp

ZERO_CHUNK = bytes(1 << 20)
_ZERO_VIEW = memoryview(ZERO_CHUNK)


_NOTHING = object()


def _prepend(first, rest):
    yield first
    for item in rest:
        yield item


class ClientGone(Exception):
    """The client closed or stalled the connection while we were sending."""


class Response(object):
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
        self._chunked = False  # the body goes as chunks (send_json_stream): keep-alive still works
        self.metrics = conn.server.metrics

    def start(self, status, headers, length=None, body=None):
        """Send the head (and a small body with it, in one segment: the socket has TCP_NODELAY)."""
        headers = list(headers)
        headers.append(("Server", self.conn.server.server_name))
        if length is not None:
            headers.append(("Content-Length", length))
        elif not self._chunked:
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
            self.cork(True)  # uncorked by Connection._handle when the response is done
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
            [("Content-Type", hp.JSON_TYPE), ("Cache-Control", "no-store")] + list(headers),
            len(body),
            body,
        )

    def send_json_stream(self, items, status=200, flush_at=64 << 10):
        """A JSON array of the items of an iterator, sent as it is produced: chunked for HTTP/1.1,
        close-delimited for HTTP/1.0. Memory holds one batch of flush_at bytes, never the array.
        The bytes are those send_json(list(items)) would send. The first item is taken before the
        head, so an error there is still a JSON error; a later one truncates the body (no final
        chunk, or a close before "]"), which the client detects."""
        items = iter(items)
        first = next(items, _NOTHING)
        chunked = self.req is not None and self.req.version == "HTTP/1.1"
        headers = [("Content-Type", hp.JSON_TYPE), ("Cache-Control", "no-store")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
            self._chunked = True
        self.start(status, headers, None)
        if self.head_only:
            return
        batch = [b"["]
        size = 1
        sep = b""
        if first is not _NOTHING:
            for item in _prepend(first, items):
                data = sep + hp.json_item(item)
                sep = b", "
                batch.append(data)
                size += len(data)
                if size >= flush_at:
                    self._send_body(b"".join(batch), chunked)
                    batch, size = [], 0
        batch.append(b"]\n")
        self._send_body(b"".join(batch), chunked)
        if chunked:
            self._send(hp.CHUNK_END)

    def _send_body(self, data, chunked):
        if chunked:
            self._send(hp.chunk_header(len(data)) + data + b"\r\n")
        else:
            self._send(data)
        self.body_sent += len(data)
        self.metrics.add("bytes_sent", self.transport, len(data))

    def send_error(self, exc, close=False):
        if close:
            self.close_after = True
            self.keep_alive = False
        body = exc.body()
        self.transport = "json"
        self.start(
            exc.status,
            [("Content-Type", hp.JSON_TYPE), ("Cache-Control", "no-store")] + exc.headers,
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
