"""NBD server I/O: sockets, TLS, sendfile and concurrency around agent.nbd.protocol.

Threads, not asyncio: dom0's Python 3.6 asyncio cannot upgrade a connection to TLS in place
(STARTTLS), and os.sendfile / os.pread release the GIL, so threads keep the socket and the page cache
busy. Per connection: one reader thread (handshake, then parsing requests), a small bounded worker
pool so several requests are in flight, and a send lock so reply frames never interleave.

A whole VHD block that lives in one file goes out as an OFFSET_DATA header followed by os.sendfile
from the VHD file (zero copy); blocks split across the chain are assembled in memory; unallocated
ranges become OFFSET_HOLE chunks. With TLS the kernel cannot encrypt, so file ranges are read with
os.pread and written through the TLS socket.
"""

import errno
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from agent.export import BYTES, HOLE, SENDFILE, Counters, ExportError
from agent.nbd import protocol as p
from agent.tickets import TicketError

log = logging.getLogger("fastpath.nbd")

DEFAULT_PORT = 10810
_ZEROS = bytes(1024 * 1024)
_MSG_MORE = getattr(socket, "MSG_MORE", 0)


class ConnectionClosed(Exception):
    """The connection ends (peer gone, timeout, protocol violation already logged)."""


class _ShortFile(Exception):
    pass


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
        max_request_length=p.MAX_REQUEST_LENGTH,
        handshake_timeout=10.0,
        idle_timeout=300.0,
        send_timeout=60.0,
        list_exports=False,
    ):
        if tls_mode not in p.TLS_MODES:
            raise ValueError("tls_mode must be one of %s" % (p.TLS_MODES,))
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
        self._sock = None
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()
        self._conns = set()
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
                c.abort("ticket %s revoked or expired" % ticket.id[:8])

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
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._next_id += 1
                    conn = Connection(self, client, addr, self._next_id)
                    self._conns.add(conn)
            if full:
                log.warning(
                    "nbd: refused %s: %d connections already", _peer(addr), self.max_connections
                )
                self.counters.add("refused_connections")
                client.close()
                continue
            t = threading.Thread(target=conn.run, name="nbd-conn-%d" % conn.id, daemon=True)
            try:
                t.start()
            except RuntimeError as exc:
                # Out of threads/memory: give the slot back and go on accepting (an exception
                # here used to end the accept thread and leave the connection counted forever).
                log.error("nbd: refused %s: cannot start its thread: %s", _peer(addr), exc)
                self._forget(conn)
                self.counters.add("refused_connections")
                client.close()
                continue
            self.counters.add("connections")

    def _forget(self, conn):
        with self._lock:
            self._conns.discard(conn)


def _peer(addr):
    try:
        return "%s:%d" % (addr[0], addr[1])
    except (TypeError, IndexError):
        return str(addr)


class Connection(object):
    """One client connection (reader thread + worker pool)."""

    def __init__(self, server, sock, addr, conn_id):
        self.server = server
        self.sock = sock
        self.raw_sock = sock
        self.addr = addr
        self.id = conn_id
        self.peer = _peer(addr)
        self.proto = p.ServerConnection(server.tls_mode, server.max_request_length)
        self.send_lock = threading.Lock()
        self.ticket_id = None
        self.export = None
        self.requests = 0
        self.bytes_sent = 0
        self.broken = None
        self.tls = False
        self._aborted = threading.Event()
        self._inflight = threading.BoundedSemaphore(server.max_inflight)
        self._pool = None

    # -- teardown --------------------------------------------------------------------------------

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

    def _cleanup(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        try:
            self.sock.close()
        except OSError:
            pass
        if self.raw_sock is not self.sock:
            try:
                self.raw_sock.close()
            except OSError:
                pass
        if self.export is not None:
            self.server.exports.release(self.ticket_id)
            self.export = None
        if self.ticket_id is not None:
            self.server.tickets.release(self.ticket_id)
        self.server._forget(self)

    # -- I/O primitives --------------------------------------------------------------------------

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
        # The TLS socket is non-blocking: OpenSSL objects must not be used by two threads at
        # once, so the reader only touches it under send_lock and never blocks there.
        view = memoryview(data)
        timeout = self.server.send_timeout
        while view:
            try:
                n = self.sock.send(view)
            except ssl.SSLWantWriteError:
                self._wait(write=True, timeout=timeout)
                continue
            except ssl.SSLWantReadError:
                self._wait(write=False, timeout=timeout)
                continue
            view = view[n:]

    def _wait(self, write, timeout):
        if write:
            _, w, _ = select.select([], [self.sock], [], timeout)
            ready = w
        else:
            ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise ConnectionClosed("peer stalled for %ds" % timeout)

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
                    return self.sock.recv(256 * 1024)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue  # a partial TLS record: wait for the rest
            except (OSError, ValueError) as exc:
                raise ConnectionClosed("recv failed: %s" % exc) from exc

    # -- main loop -------------------------------------------------------------------------------

    def run(self):
        start = time.time()
        reason = "closed by client"
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tv = struct.pack("ll", int(self.server.send_timeout), 0)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            self._handshake()
            if self.proto.in_transmission:
                reason = self._transmission()
        except p.ProtocolError as exc:
            reason = "protocol error: %s" % exc
            self.server.counters.add("protocol_errors")
            log.warning("nbd: %s: protocol error: %s", self.peer, exc)
        except ConnectionClosed as exc:
            reason = self.broken or str(exc)
        except Exception as exc:
            reason = "internal error: %s" % exc
            log.exception("nbd: %s: internal error", self.peer)
        finally:
            self._cleanup()
            log.info(
                "nbd: connection %d from %s closed after %.1fs: ticket=%s requests=%d sent=%d "
                "tls=%s reason=%s",
                self.id,
                self.peer,
                time.time() - start,
                (self.ticket_id or "-")[:8],
                self.requests,
                self.bytes_sent,
                self.proto.tls_active,
                reason,
            )

    def _handshake(self):
        deadline = time.time() + self.server.handshake_timeout
        self._send(self.proto.greeting())
        while True:
            ev = self.proto.next_event()
            if ev is None:
                if self.proto.in_transmission:
                    return
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise ConnectionClosed("handshake timeout")
                data = self._recv(remaining)
                if data is None:
                    raise ConnectionClosed("handshake timeout")
                if not data:
                    raise ConnectionClosed("client closed during handshake")
                self.proto.feed(data)
                continue
            if isinstance(ev, p.SendReply):
                self._send(ev.data)
            elif isinstance(ev, p.AbortRequest):
                self._send(ev.data)
                raise ConnectionClosed("client aborted the handshake")
            elif isinstance(ev, p.ListRequest):
                self._send(self.proto.list_reply(self._list_names()))
            elif isinstance(ev, p.StartTLS):
                self._send(ev.data)
                self._start_tls(deadline)
                self.proto.tls_established()
            elif isinstance(ev, p.ExportRequest):
                self._send(self._answer_export(ev))
                if self.proto.in_transmission:
                    return

    def _list_names(self):
        if not self.server.list_exports:
            return []
        return [t.id for t in self.server.tickets.list() if t.usable()]

    def _start_tls(self, deadline):
        ctx = self.server.ssl_context
        self.sock.settimeout(max(0.1, deadline - time.time()))
        try:
            tls = ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            self.sock = self.raw_sock = tls
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionClosed("TLS handshake failed: %s" % exc) from exc
        tls.setblocking(False)
        self.tls = True

    def _answer_export(self, ev):
        name = ev.name
        info = ev.option == p.OPT_INFO
        try:
            if info:
                ticket = self.server.tickets.get(name)
            else:
                ticket = self.server.tickets.acquire(name)
                # Named before the export opens (which may wait on the chain and SM's locks), so
                # a revocation from now on aborts this connection (_ticket_gone), and one that
                # came before is seen by the check below. _cleanup releases the ticket from here.
                self.ticket_id = ticket.id
        except TicketError as exc:
            return self._refuse(name, exc)
        try:
            export = self.server.exports.acquire(ticket)
        except Exception as exc:
            self._drop_ticket()
            log.warning("nbd: %s: cannot open export for ticket %s: %s", self.peer, name[:8], exc)
            return self.proto.reject_export(p.REP_ERR_UNKNOWN, "export unavailable: %s" % exc)
        try:
            self.server.tickets.get(ticket.id)  # revoked or expired while the export opened?
        except TicketError as exc:
            self.server.exports.release(ticket.id)
            self._drop_ticket()
            return self._refuse(name, exc)
        if info:
            try:
                return self.proto.accept_export(export.size, export.description)
            finally:
                self.server.exports.release(ticket.id)
        self.export = export
        return self.proto.accept_export(export.size, export.description)

    def _drop_ticket(self):
        if self.ticket_id is not None:
            ticket_id, self.ticket_id = self.ticket_id, None
            self.server.tickets.release(ticket_id)

    def _refuse(self, name, exc):
        log.warning("nbd: %s: export %r refused: %s", self.peer, name[:40], exc)
        self.server.counters.add("refused_tickets")
        return self.proto.reject_export(p.REP_ERR_UNKNOWN, "export refused: %s" % exc)

    # -- transmission ----------------------------------------------------------------------------

    def _transmission(self):
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.server.workers))
        idle = self.server.idle_timeout
        while True:
            ev = self.proto.next_event()
            if ev is None:
                if self.broken:
                    raise ConnectionClosed(self.broken)
                data = self._recv(idle)
                if data is None:
                    if self._busy():
                        continue
                    return "idle timeout (%ds)" % idle
                if not data:
                    return "closed by client"
                self.proto.feed(data)
                continue
            if isinstance(ev, p.Disconnect):
                self._pool.shutdown(wait=True)
                return "NBD_CMD_DISC"
            self.requests += 1
            if isinstance(ev, p.InvalidRequest):
                self.server.counters.add("request_errors")
                with self.send_lock:
                    self._send(
                        self.proto.error_reply(ev.request.handle, ev.error.code, ev.error.message)
                    )
                continue
            # Back-pressure: stop reading when max_inflight requests are being served.
            while not self._inflight.acquire(timeout=1.0):
                if self.broken:
                    raise ConnectionClosed(self.broken)
            if self.server.workers == 0:
                self._serve_request(ev)
            else:
                self._pool.submit(self._serve_request, ev)

    def _busy(self):
        # All permits back means nothing is in flight.
        got = 0
        try:
            while got < self.server.max_inflight and self._inflight.acquire(blocking=False):
                got += 1
            return got < self.server.max_inflight
        finally:
            for _ in range(got):
                self._inflight.release()

    def _serve_request(self, req):
        try:
            if self.broken:
                return
            if req.type == p.CMD_READ:
                self._reply_read(req)
            elif req.type == p.CMD_BLOCK_STATUS:
                self._reply_block_status(req)
            else:  # FLUSH, CACHE: nothing to do on a read-only export
                with self.send_lock:
                    self._send(p.simple_reply(req.handle, 0))
        except ConnectionClosed as exc:
            self.abort(str(exc))
        except Exception as exc:
            log.exception("nbd: %s: request %s failed", self.peer, req)
            self.abort("internal error: %s" % exc)
        finally:
            self._inflight.release()

    def _fail(self, req, code, message):
        self.server.counters.add("request_errors")
        log.warning(
            "nbd: %s: %s [%d, +%d) failed: %s", self.peer, req.name, req.offset, req.length, message
        )
        with self.send_lock:
            self._send(self.proto.error_reply(req.handle, code, message))

    def _reply_block_status(self, req):
        export = self.export
        chunks = []
        try:
            for ctx_id, name in sorted(self.proto.meta_contexts.items()):
                if name == p.CONTEXT_ALLOCATION:
                    descs = [
                        (n, 0 if kind != HOLE else p.STATE_HOLE | p.STATE_ZERO)
                        for _, n, kind in export.extents(req.offset, req.length)
                    ]
                else:
                    descs = [
                        (n, p.STATE_CHANGED if changed else 0)
                        for _, n, changed in export.changed(req.offset, req.length)
                    ]
                if req.flags & p.CMD_FLAG_REQ_ONE:
                    descs = descs[:1]
                chunks.append((ctx_id, descs))
        except Exception as exc:
            self._fail(req, p.EIO, "block status failed: %s" % exc)
            return
        out = []
        for i, (ctx_id, descs) in enumerate(chunks):
            out.append(p.block_status_chunk(req.handle, ctx_id, descs, done=i == len(chunks) - 1))
        with self.send_lock:
            self._send(b"".join(out))

    def _reply_read(self, req):
        try:
            pieces = self.export.plan_read(req.offset, req.length)
        except Exception as exc:
            self._fail(req, p.EIO, "read failed: %s" % exc)
            return
        # Bytes that leave through sendfile/pread are read from the files while they stream, after
        # plan_read checked the chain: check again before the reply is complete (ChainChanged ->
        # EIO, or a hard disconnect for simple replies), so a chain that changed mid-send never
        # reaches the client as a successful read.
        streamed = any(piece[0] == SENDFILE for piece in pieces)
        with self.send_lock:
            if not self.proto.structured:
                self._send(p.simple_reply(req.handle, 0), more=True)
                try:
                    if streamed:
                        # Hold back the reply's last byte until the chain is checked.
                        last = self._send_all_but_last_byte(pieces)
                        problem = self._chain_problem()
                        if problem is not None:
                            raise ConnectionClosed("simple reply withheld: %s" % problem)
                        self._send(last)
                    else:
                        for piece in pieces:
                            self._send_piece(piece)
                except _ShortFile as exc:
                    # The header promised data we no longer have: only a hard disconnect is left.
                    raise ConnectionClosed(
                        "short read after a simple reply header: %s" % exc
                    ) from exc
                return
            if req.length == 0:
                self._send(p.none_chunk(req.handle))
                return
            error = None
            if req.flags & p.CMD_FLAG_DF:
                # One content chunk: holes are sent as explicit zeroes.
                self._send(p.offset_data_header(req.handle, req.offset, req.length), more=True)
                for piece in pieces:
                    try:
                        self._send_piece(piece)
                    except _ShortFile as exc:
                        error = str(exc)
            else:
                pos = req.offset
                for idx, piece in enumerate(pieces):
                    # With streamed pieces the final chunk comes after the check below.
                    done = idx == len(pieces) - 1 and error is None and not streamed
                    kind = piece[0]
                    if kind == HOLE:
                        n = piece[1]
                        # Count before sending: the final chunk lets the client move on.
                        self.server.counters.record("hole", n)
                        self._send(p.offset_hole(req.handle, pos, n, done=done))
                    elif kind == BYTES:
                        n = len(piece[1])
                        self._send(p.offset_data_header(req.handle, pos, n, done=done))
                        self._send_piece(piece)
                    else:
                        # Not final: an error can still show up while the file streams.
                        n = piece[3]
                        self._send(p.offset_data_header(req.handle, pos, n), more=True)
                        try:
                            self._send_piece(piece)
                        except _ShortFile as exc:
                            error = str(exc)
                    pos += n
                if error is None and not streamed:
                    return
            if error is None and streamed:
                error = self._chain_problem()
            if error is not None:
                log.warning("nbd: %s: READ [%d, +%d): %s", self.peer, req.offset, req.length, error)
                self.server.counters.add("request_errors")
                self._send(p.error_chunk(req.handle, p.EIO, error))
            else:
                self._send(p.none_chunk(req.handle))

    def _chain_problem(self):
        """None if the export's chain is unchanged since it was opened, else why (see
        agent.export.ChainGuard)."""
        try:
            self.export.check()
        except ExportError as exc:
            return str(exc)
        return None

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
            raise _ShortFile("VHD file ends at offset %d, 1 byte missing" % (offset + n - 1))
        return last

    def _send_piece(self, piece):
        """Send one planned piece's payload. Raises _ShortFile (after zero padding) when a VHD file
        is shorter than its metadata promised."""
        kind = piece[0]
        counters = self.server.counters
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
                    raise _ShortFile(
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
                raise _ShortFile(
                    "VHD file ends at offset %d, %d bytes missing" % (offset + done, n - done)
                )
            done += sent
        self.bytes_sent += n

    def _send_zeros(self, n):
        while n > 0:
            k = min(n, len(_ZEROS))
            self._send(memoryview(_ZEROS)[:k])
            n -= k
