"""One NBD client connection: handshake, transmission, the worker pool and the replies.

What lives here: Connection, run by agent.nbd.server in a thread of its own per client. It drives
the sans-IO state machine (agent.nbd.protocol) with bytes from its socket, answers the options
(ticket lookup, export open through the server's ExportCache), then reads requests and hands them
to a small bounded worker pool so several are in flight; a send lock keeps reply frames from
interleaving. It frames READ replies (simple, or structured: OFFSET_DATA / OFFSET_HOLE chunks, one
chunk with NBD_CMD_FLAG_DF) around the pieces of the export's read plan, and BLOCK_STATUS replies
for base:allocation and fastpath:changed. The socket side (sends, TLS, sendfile) is its base class,
agent.nbd.transport.Transport.
"""

import logging
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from agent.export import BYTES, HOLE, SENDFILE, ExportError
from agent.nbd import protocol as p
from agent.nbd import wire as w
from agent.nbd.transport import ConnectionClosed, ShortFile, Transport
from agent.tickets import TicketError, log_id

log = logging.getLogger("fastpath.nbd")


def peer_name(addr):
    try:
        return "%s:%d" % (addr[0], addr[1])
    except (TypeError, IndexError):
        return str(addr)


class Connection(Transport):
    """One client connection (reader thread + worker pool)."""

    def __init__(self, server, sock, addr, conn_id):
        Transport.__init__(self, sock, server.send_timeout, server.counters)
        self.server = server
        self.addr = addr
        self.id = conn_id
        self.peer = peer_name(addr)
        self.proto = p.ServerConnection(server.tls_mode, server.max_request_length)
        self.ticket_id = None
        self.export = None
        self.requests = 0
        self._inflight = threading.BoundedSemaphore(server.max_inflight)
        self._pool = None
        self.slot = None  # agent.slots.Slot, given by the server at accept

    # -- teardown --------------------------------------------------------------------------------

    def _cleanup(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._close_sockets()
        if self.export is not None:
            self.server.exports.release(self.ticket_id)
            self.export = None
        if self.ticket_id is not None:
            self.server.tickets.release(self.ticket_id)
        self.server._forget(self)

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
                if self.slot is not None:
                    self.server.slots.authenticate(self.slot)  # out of the handshake budget
                    self.server.slots.set_waiting(self.slot, False)
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
                log_id(self.ticket_id),
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
                self._start_tls(self.server.ssl_context, deadline)
                self.proto.tls_established()
            elif isinstance(ev, p.ExportRequest):
                # Opening the export may wait on SM's locks: not displaceable meanwhile.
                if self.slot is not None and not self.server.slots.set_waiting(self.slot, False):
                    raise ConnectionClosed(self.broken or "displaced")
                try:
                    answer = self._answer_export(ev)
                finally:
                    if self.slot is not None and not self.proto.in_transmission:
                        self.server.slots.set_waiting(self.slot, True)
                self._send(answer)
                if self.proto.in_transmission:
                    return

    def _list_names(self):
        if not self.server.list_exports:
            return []
        return [t.id for t in self.server.tickets.list() if t.usable()]

    def _answer_export(self, ev):
        name = ev.name
        info = ev.option == w.OPT_INFO
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
            log.warning(
                "nbd: %s: cannot open export for ticket %s: %s", self.peer, log_id(name), exc
            )
            return self.proto.reject_export(w.REP_ERR_UNKNOWN, "export unavailable: %s" % exc)
        try:
            self.server.tickets.get(ticket.id)  # revoked or expired while the export opened?
        except TicketError as exc:
            self.server.exports.release(ticket.id)
            self._drop_ticket()
            return self._refuse(name, exc)
        if info:
            try:
                return self._accept(export)
            finally:
                self.server.exports.release(ticket.id)
        self.export = export
        return self._accept(export)

    def _accept(self, export):
        return self.proto.accept_export(
            export.size, export.description, getattr(export, "block_size", None)
        )

    def _drop_ticket(self):
        if self.ticket_id is not None:
            ticket_id, self.ticket_id = self.ticket_id, None
            self.server.tickets.release(ticket_id)

    def _refuse(self, name, exc):
        log.warning("nbd: %s: export %r refused: %s", self.peer, log_id(name), exc)
        self.server.counters.add("refused_tickets")
        return self.proto.reject_export(w.REP_ERR_UNKNOWN, "export refused: %s" % exc)

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
            if req.type == w.CMD_READ:
                self._reply_read(req)
            elif req.type == w.CMD_BLOCK_STATUS:
                self._reply_block_status(req)
            else:  # FLUSH, CACHE: nothing to do on a read-only export
                with self.send_lock:
                    self._send(w.simple_reply(req.handle, 0))
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
        # Runs come from generators over bounded windows and stop at max_descriptors per
        # context: the reply and the memory behind it stay small however fragmented the disk.
        export = self.export
        cap = self.server.max_descriptors
        req_one = bool(req.flags & w.CMD_FLAG_REQ_ONE)
        chunks = []
        try:
            for ctx_id, name in sorted(self.proto.meta_contexts.items()):
                if name == w.CONTEXT_ALLOCATION:
                    runs = _runs(export, "iter_extents", "extents", req)
                    descs = p.block_status_descriptors(runs, _allocation_flags, cap, req_one)
                else:
                    runs = _runs(export, "iter_changed", "changed", req)
                    descs = p.block_status_descriptors(runs, _changed_flags, cap, req_one)
                chunks.append((ctx_id, descs))
        except Exception as exc:
            self._fail(req, w.EIO, "block status failed: %s" % exc)
            return
        out = []
        for i, (ctx_id, descs) in enumerate(chunks):
            out.append(w.block_status_chunk(req.handle, ctx_id, descs, done=i == len(chunks) - 1))
        with self.send_lock:
            self._send(b"".join(out))

    def _reply_read(self, req):
        try:
            pieces = self.export.plan_read(req.offset, req.length)
        except Exception as exc:
            self._fail(req, w.EIO, "read failed: %s" % exc)
            return
        # Bytes that leave through sendfile/pread are read from the files while they stream, after
        # plan_read checked the chain: check again before the reply is complete (ChainChanged ->
        # EIO, or a hard disconnect for simple replies), so a chain that changed mid-send never
        # reaches the client as a successful read.
        streamed = any(piece[0] == SENDFILE for piece in pieces)
        with self.send_lock:
            if not self.proto.structured:
                self._send(w.simple_reply(req.handle, 0), more=True)
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
                except ShortFile as exc:
                    # The header promised data we no longer have: only a hard disconnect is left.
                    raise ConnectionClosed(
                        "short read after a simple reply header: %s" % exc
                    ) from exc
                return
            if req.length == 0:
                self._send(w.none_chunk(req.handle))
                return
            error = None
            if req.flags & w.CMD_FLAG_DF:
                # One content chunk: holes are sent as explicit zeroes.
                self._send(w.offset_data_header(req.handle, req.offset, req.length), more=True)
                for piece in pieces:
                    try:
                        self._send_piece(piece)
                    except ShortFile as exc:
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
                        self._send(w.offset_hole(req.handle, pos, n, done=done))
                    elif kind == BYTES:
                        n = len(piece[1])
                        self._send(w.offset_data_header(req.handle, pos, n, done=done))
                        self._send_piece(piece)
                    else:
                        # Not final: an error can still show up while the file streams.
                        n = piece[3]
                        self._send(w.offset_data_header(req.handle, pos, n), more=True)
                        try:
                            self._send_piece(piece)
                        except ShortFile as exc:
                            error = str(exc)
                    pos += n
                if error is None and not streamed:
                    return
            if error is None and streamed:
                error = self._chain_problem()
            if error is not None:
                log.warning("nbd: %s: READ [%d, +%d): %s", self.peer, req.offset, req.length, error)
                self.server.counters.add("request_errors")
                self._send(w.error_chunk(req.handle, w.EIO, error))
            else:
                self._send(w.none_chunk(req.handle))

    def _chain_problem(self):
        """None if the export's chain is unchanged since it was opened, else why (see
        agent.export.ChainGuard)."""
        try:
            self.export.check()
        except ExportError as exc:
            return str(exc)
        return None


def _runs(export, lazy, eager, req):
    """The export's runs over the request: its generator (bounded windows) when it has one."""
    fn = getattr(export, lazy, None) or getattr(export, eager)
    return fn(req.offset, req.length)


def _allocation_flags(run):
    return w.STATE_HOLE | w.STATE_ZERO if run[2] == HOLE else 0


def _changed_flags(run):
    return w.STATE_CHANGED if run[2] else 0
