"""The socket side of one NBD connection: sends, receives, STARTTLS and the READ payloads.

What lives here: Transport, the base class of agent.nbd.connection.Connection. It owns the socket
(plain, then TLS after STARTTLS) and only moves bytes; what they mean is the connection's business.

- _send(data, more): everything, or ConnectionClosed. more=True sets MSG_MORE so that a chunk header
  and the sendfile payload after it leave in the same packets. Over TLS, OpenSSL objects must not
  be used by two threads at once, so every use of the TLS socket is under send_lock: senders write
  in the socket's timeout mode (SSL writes of up to 1 MiB, OpenSSL's waits for a full socket
  done in C without the GIL; send_timeout bounds each write), and the reader switches it to
  non-blocking for its recv, so a partial TLS record never holds the lock.
- _recv(timeout): bytes, b'' at EOF, None after `timeout` seconds without any.
- _start_tls(ctx, deadline): the server side of the TLS handshake after NBD_OPT_STARTTLS.
- _send_piece(piece): one piece of a READ plan (agent.export.Export.plan_read). A file range goes
  out with os.sendfile from the VHD file (zero copy) in clear text; with TLS the kernel cannot
  encrypt, so it is read with os.pread and written through the TLS socket. Holes are zeros,
  assembled bytes go as they are. A VHD file shorter than its metadata promised is padded with
  zeros (the frame stays well formed) and raises ShortFile.
- abort(reason): shut the connection down from another thread (ticket revoked, server stopping).
"""

import errno
import os
import select
import socket
import ssl
import threading
import time

from agent.export import BYTES, HOLE, SENDFILE

_ZEROS = bytes(1024 * 1024)
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_TLS_WRITE = 1024 * 1024  # bytes per SSL write call (see Transport._tls_send)


class ConnectionClosed(Exception):
    """The connection ends (peer gone, timeout, protocol violation already logged)."""


class ShortFile(Exception):
    """A VHD file ended before the bytes its metadata promised (the payload was zero padded)."""


class Transport(object):
    """The socket of one connection and the byte moving around it (see the module docs)."""

    def __init__(self, sock, send_timeout, counters):
        self.sock = sock
        self.raw_sock = sock
        self.send_timeout = send_timeout
        self.counters = counters
        self.send_lock = threading.Lock()
        self.bytes_sent = 0
        self.broken = None
        self.tls = False
        self._aborted = threading.Event()

    def abort(self, reason):
        """Close from another thread (ticket revoked, server stopping)."""
        if self.broken is None:
            self.broken = reason
        self._aborted.set()
        try:
            # The plain socket's shutdown, also on a TLS socket: SSLSocket.shutdown() drops its
            # TLS object first, and a worker sending at that moment wrote its bytes (disk data)
            # in clear text on the wire.
            socket.socket.shutdown(self.raw_sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _close_sockets(self):
        try:
            self.sock.close()
        except OSError:
            pass
        if self.raw_sock is not self.sock:
            try:
                self.raw_sock.close()
            except OSError:
                pass

    def _send(self, data, more=False):
        """Send everything (callers in transmission hold send_lock). more=True: a payload follows
        at once (MSG_MORE keeps a chunk header and its sendfile payload in the same packets)."""
        try:
            if self.tls:
                self._tls_send(data)
            elif more:
                self.sock.sendall(data, _MSG_MORE)
            else:
                self.sock.sendall(data)
        except (OSError, ValueError) as exc:
            raise ConnectionClosed("send failed: %s" % exc) from exc
        self.bytes_sent += len(data)

    def _tls_send(self, data):
        # Timeout mode (see _start_tls): SSL_write takes the whole piece and OpenSSL's waits for
        # room in the socket happen in C, without the GIL; send_lock is held by the caller.
        # Python bounds one write call as a whole by the timeout, so pieces of _TLS_WRITE bytes
        # keep send_timeout a stall limit (no progress for that long), not a rate floor.
        view = memoryview(data)
        try:
            for start in range(0, len(view), _TLS_WRITE):
                self.sock.sendall(view[start : start + _TLS_WRITE])
        except socket.timeout:
            raise ConnectionClosed(
                "peer stalled: %d bytes not taken in %ds" % (_TLS_WRITE, self.send_timeout)
            ) from None

    def _recv(self, timeout):
        """Bytes from the peer; b'' at EOF; None when `timeout` seconds pass without any."""
        deadline = time.time() + timeout
        while True:
            if self._aborted.is_set():
                raise ConnectionClosed(self.broken or "aborted")
            if not (self.tls and self.sock.pending()):
                remaining = deadline - time.time()
                if remaining <= 0:
                    return None
                try:
                    r, _, _ = select.select([self.sock], [], [], remaining)
                except (OSError, ValueError) as exc:
                    raise ConnectionClosed("select failed: %s" % exc) from exc
                if not r:
                    return None
            try:
                if not self.tls:
                    return self.sock.recv(256 * 1024)
                with self.send_lock:
                    # Non-blocking for this recv only: a partial record must not hold the lock.
                    self.sock.settimeout(0.0)
                    try:
                        return self.sock.recv(256 * 1024)
                    finally:
                        self.sock.settimeout(self.send_timeout)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue  # a partial TLS record: wait for the rest
            except (OSError, ValueError) as exc:
                raise ConnectionClosed("recv failed: %s" % exc) from exc

    # -- STARTTLS and READ payloads ------------------------------------------------------------

    def _start_tls(self, ctx, deadline):
        self.sock.settimeout(max(0.1, deadline - time.time()))
        try:
            tls = ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            self.sock = self.raw_sock = tls
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionClosed("TLS handshake failed: %s" % exc) from exc
        tls.settimeout(self.send_timeout)
        self.tls = True

    def _send_all_but_last_byte(self, pieces):
        """Send every piece but the reply's last byte, which is returned (as bytes)."""
        for piece in pieces[:-1]:
            self._send_piece(piece)
        piece = pieces[-1]
        kind = piece[0]
        if kind == HOLE:
            self._send_piece((HOLE, piece[1] - 1))
            return b"\0"
        if kind == BYTES:
            self._send_piece((BYTES, piece[1][:-1]))
            return bytes(piece[1][-1:])
        _, fd, offset, n = piece
        self._send_piece((SENDFILE, fd, offset, n - 1))
        last = os.pread(fd, 1, offset + n - 1)
        if not last:
            raise ShortFile("VHD file ends at offset %d, 1 byte missing" % (offset + n - 1))
        return last

    def _send_piece(self, piece):
        """Send one planned piece's payload. Raises ShortFile (after zero padding) when a VHD file
        is shorter than its metadata promised."""
        kind = piece[0]
        counters = self.counters
        if kind == HOLE:
            n = piece[1]
            counters.record("hole", n)
            self._send_zeros(n)
            return
        if kind == BYTES:
            counters.record("assembled", len(piece[1]))
            self._send(piece[1])
            return
        assert kind == SENDFILE
        _, fd, offset, n = piece
        if self.tls:
            counters.record("pread", n)
            done = 0
            while done < n:
                data = os.pread(fd, min(n - done, 4 * 1024 * 1024), offset + done)
                if not data:
                    self._send_zeros(n - done)
                    raise ShortFile(
                        "VHD file ends at offset %d, %d bytes missing" % (offset + done, n - done)
                    )
                self._send(data)
                done += len(data)
            return
        counters.record("sendfile", n)
        out = self.sock.fileno()
        done = 0
        while done < n:
            try:
                sent = os.sendfile(out, fd, offset + done, n - done)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise ConnectionClosed("sendfile failed: %s" % exc) from exc
            if sent == 0:
                self.bytes_sent += done
                self._send_zeros(n - done)
                raise ShortFile(
                    "VHD file ends at offset %d, %d bytes missing" % (offset + done, n - done)
                )
            done += sent
        self.bytes_sent += n

    def _send_zeros(self, n):
        while n > 0:
            k = min(n, len(_ZEROS))
            self._send(memoryview(_ZEROS)[:k])
            n -= k
