"""Sans-IO NBD server: bytes in, events out, bytes back (fixed newstyle only).

The state machine never touches a socket. The I/O layer (agent.nbd.server) does::

    conn = ServerConnection(tls_mode="require")
    send(conn.greeting())
    while True:
        conn.feed(recv())
        for event in iter(conn.next_event, None):
            ...   # answer with conn.accept_export(...), agent.nbd.wire's reply builders, etc.

Two kinds of failure, as in ovirt-imageio's nbd.py:

- ProtocolError: the peer broke the protocol (bad magic, unknown client flags, oversized option,
  bytes after STARTTLS, ...). The connection cannot continue: close it.
- RequestError: one transmission request is invalid (out of range, bad flags, write on a read-only
  export, ...). It is answered with an error and the connection goes on.

What this server offers (proto.md asks servers to document their metadata contexts):

- Export names are ticket ids. Exports are read-only; transmission flags HAS_FLAGS, READ_ONLY,
  CAN_MULTI_CONN, and SEND_DF once structured replies are negotiated.
- NBD_INFO_BLOCK_SIZE: minimum 1 (any alignment is served), preferred the export's own block
  size (2 MiB for VHD, capped at the maximum), maximum 32 MiB (larger READ/CACHE requests fail with EINVAL; a larger WRITE payload closes).
- `base:allocation`: HOLE|ZERO where no file of the chain holds the sectors, 0 elsewhere.
- `fastpath:changed`: bit 0 set on the 2 MiB blocks that differ from the ticket's base VDI (blocks
  allocated in the chain above the base); without a base, on every allocated block. Queries:
  `fastpath:changed`, or `fastpath:` (all fastpath contexts) in LIST_META_CONTEXT.
- BLOCK_STATUS: at most max_descriptors (default 8192) descriptors per context and reply; the
  spec lets a server answer a shorter range, and clients ask again from where the reply ended
  (block_status_descriptors).
- WRITE, TRIM, WRITE_ZEROES, RESIZE -> EPERM; FLUSH and CACHE succeed and do nothing; unknown
  commands and flags -> EINVAL.
- TLS modes: off (STARTTLS -> ERR_POLICY), optional (SELECTIVETLS with no TLS-only export), require
  (FORCEDTLS: everything but STARTTLS and ABORT -> ERR_TLS_REQD; EXPORT_NAME closes).

What lives here: the two error types, the events, and ServerConnection (greeting, option haggling,
STARTTLS, export selection, request validation). The numbers and the reply bytes are agent.nbd.wire.

References: NetworkBlockDevice/nbd doc/proto.md (option haggling, structured replies, block status,
TLS modes, block size constraints).
"""

import struct

from agent.nbd import wire as w


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed."""


class RequestError(Exception):
    """One request fails with an NBD error code; the connection continues."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


def block_status_descriptors(runs, flags_of, max_descriptors, req_one=False):
    """The descriptors [(length, flags)] of one BLOCK_STATUS reply for one metadata context.

    runs: an iterable (a generator is best: it is consumed only as far as needed) of runs
    (start, length, ...) covering the request from its offset, in order; flags_of(run) gives the
    run's NBD flags. Runs with equal flags merge; at most max_descriptors come back (one with
    NBD_CMD_FLAG_REQ_ONE), so a reply stays small whatever the disk's fragmentation: proto.md
    lets the server describe less than the requested length, and the client asks again."""
    limit = 1 if req_one else max(1, max_descriptors)
    out = []
    for run in runs:
        n = run[1]
        if n <= 0:
            continue
        flags = flags_of(run)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        elif len(out) >= limit:
            break
        else:
            out.append((n, flags))
    return out


def preferred_block_size(block_size, max_block):
    """The preferred block size to advertise: the export's, when it is a power of two from 512
    up to max_block (proto.md: a power of two, at least 512, at most the maximum), else the
    nearest such value (the default 2 MiB when unknown)."""
    if not block_size:
        block_size = w.PREFERRED_BLOCK_SIZE
    preferred = 512
    while preferred * 2 <= min(block_size, max_block):
        preferred *= 2
    return preferred


# --- Events ---------------------------------------------------------------------------------------


class Event(object):
    __slots__ = ()

    def __repr__(self):
        fields = ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__)
        return "%s(%s)" % (type(self).__name__, fields)

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )


class SendReply(Event):
    """An option the state machine answered itself: send `data`."""

    __slots__ = ("option", "data")

    def __init__(self, option, data):
        self.option = option
        self.data = data


class AbortRequest(Event):
    """NBD_OPT_ABORT: send `data` (the ACK), then close."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class ListRequest(Event):
    """NBD_OPT_LIST: answer with conn.list_reply(names)."""

    __slots__ = ()


class StartTLS(Event):
    """NBD_OPT_STARTTLS accepted: send `data` (the ACK), run the TLS handshake, then call
    conn.tls_established()."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class ExportRequest(Event):
    """NBD_OPT_EXPORT_NAME / INFO / GO: resolve `name` and answer with conn.accept_export() or
    conn.reject_export()."""

    __slots__ = ("option", "name", "info_requests")

    def __init__(self, option, name, info_requests=()):
        self.option = option
        self.name = name
        self.info_requests = tuple(info_requests)


class Request(Event):
    """A valid transmission request."""

    __slots__ = ("handle", "type", "flags", "offset", "length")

    def __init__(self, handle, type, flags, offset, length):
        self.handle = handle
        self.type = type
        self.flags = flags
        self.offset = offset
        self.length = length

    @property
    def name(self):
        return w.COMMAND_NAMES.get(self.type, "CMD_%d" % self.type)


class InvalidRequest(Event):
    """A transmission request that fails: answer with conn.error_reply(request.handle, error)."""

    __slots__ = ("request", "error")

    def __init__(self, request, error):
        self.request = request
        self.error = error


class Disconnect(Event):
    """NBD_CMD_DISC: finish in-flight requests, then close."""

    __slots__ = ()


# --- The state machine ----------------------------------------------------------------------------

_CLIENT_FLAGS = "client_flags"
_OPTIONS = "options"
_TLS_HANDSHAKE = "tls_handshake"
_TRANSMISSION = "transmission"
_CLOSED = "closed"


class ServerConnection(object):
    """One NBD server connection, from greeting to disconnect, without I/O."""

    def __init__(self, tls_mode="off", max_request_length=w.MAX_REQUEST_LENGTH):
        if tls_mode not in w.TLS_MODES:
            raise ValueError("tls_mode must be one of %s, got %r" % (w.TLS_MODES, tls_mode))
        self.tls_mode = tls_mode
        self.tls_active = False
        self.max_request_length = max_request_length
        self.state = _CLIENT_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.meta_export = None  # export name the meta contexts were selected for
        self.meta_contexts = {}  # id -> name
        self.export_name = None
        self.export_size = None
        self.transmission_flags = 0
        self.options_seen = 0
        self._buf = bytearray()
        self._pending_export = None  # ExportRequest waiting for accept/reject
        self._skip_write = 0  # payload bytes of a refused WRITE still to discard

    # -- input ---------------------------------------------------------------------------------

    def greeting(self):
        return w.greeting()

    def feed(self, data):
        if self.state == _CLOSED:
            return
        self._buf += data

    @property
    def buffered(self):
        return len(self._buf)

    @property
    def in_transmission(self):
        return self.state == _TRANSMISSION

    @property
    def closed(self):
        return self.state == _CLOSED

    def _take(self, n):
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def next_event(self):
        """The next event, or None when more bytes are needed (or while an ExportRequest awaits
        its answer). Raises ProtocolError."""
        while True:
            if self.state == _CLOSED:
                return None
            if self._pending_export is not None:
                return None  # paused until accept_export() / reject_export()
            if self.state == _CLIENT_FLAGS:
                if len(self._buf) < 4:
                    return None
                (flags,) = w.U32.unpack(self._take(4))
                if flags & ~(w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES):
                    raise ProtocolError("unknown client flags 0x%08x" % flags)
                if not flags & w.FLAG_C_FIXED_NEWSTYLE:
                    raise ProtocolError("client does not speak fixed newstyle (flags 0x%x)" % flags)
                self.no_zeroes = bool(flags & w.FLAG_C_NO_ZEROES)
                self.state = _OPTIONS
                continue
            if self.state == _OPTIONS:
                return self._next_option()
            if self.state == _TLS_HANDSHAKE:
                return None
            if self.state == _TRANSMISSION:
                return self._next_request()

    # -- option haggling -------------------------------------------------------------------------

    def _next_option(self):
        if len(self._buf) < w.OPTION_HEADER.size:
            return None
        magic, option, length = w.OPTION_HEADER.unpack_from(self._buf)
        if magic != w.IHAVEOPT:
            raise ProtocolError("bad option magic 0x%016x" % magic)
        if length > w.MAX_OPTION_DATA:
            raise ProtocolError(
                "option %s data length %d exceeds %d"
                % (w.option_name(option), length, w.MAX_OPTION_DATA)
            )
        if len(self._buf) < w.OPTION_HEADER.size + length:
            return None
        del self._buf[: w.OPTION_HEADER.size]
        data = self._take(length)
        self.options_seen += 1
        if self.options_seen > w.MAX_OPTIONS:
            raise ProtocolError("more than %d options: denial of service" % w.MAX_OPTIONS)
        return self._handle_option(option, data)

    def _reply(self, option, reply_type, data=b""):
        return SendReply(option, w.option_reply(option, reply_type, data))

    def _error(self, option, reply_type, message):
        return SendReply(option, w.option_error(option, reply_type, message))

    def _tls_required(self):
        return self.tls_mode == "require" and not self.tls_active

    def _handle_option(self, option, data):
        if option == w.OPT_ABORT:
            return AbortRequest(w.option_reply(option, w.REP_ACK))
        if option == w.OPT_STARTTLS:
            return self._opt_starttls(data)
        if self._tls_required():
            if option == w.OPT_EXPORT_NAME:
                raise ProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS while TLS is required")
            return self._error(option, w.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
        if option == w.OPT_EXPORT_NAME:
            name = self._decode_name(data, option, fatal=True)
            return self._expect_export(ExportRequest(option, name))
        if option in (w.OPT_INFO, w.OPT_GO):
            return self._opt_info_go(option, data)
        if option == w.OPT_LIST:
            if data:
                return self._error(option, w.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return ListRequest()
        if option == w.OPT_STRUCTURED_REPLY:
            if data:
                return self._error(
                    option, w.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"
                )
            if self.structured:
                return self._error(
                    option, w.REP_ERR_INVALID, "structured replies already negotiated"
                )
            self.structured = True
            return self._reply(option, w.REP_ACK)
        if option in (w.OPT_LIST_META_CONTEXT, w.OPT_SET_META_CONTEXT):
            return self._opt_meta_context(option, data)
        return self._error(
            option, w.REP_ERR_UNSUP, "option %s not supported" % w.option_name(option)
        )

    def _opt_starttls(self, data):
        option = w.OPT_STARTTLS
        if self.tls_mode == "off":
            return self._error(option, w.REP_ERR_POLICY, "TLS is not enabled on this server")
        if data:
            return self._error(option, w.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            return self._error(option, w.REP_ERR_INVALID, "TLS is already active")
        if self._buf:
            raise ProtocolError("client sent data after NBD_OPT_STARTTLS before the reply")
        self.state = _TLS_HANDSHAKE
        return StartTLS(w.option_reply(option, w.REP_ACK))

    def tls_established(self):
        """The I/O layer finished the TLS handshake: negotiation starts over (proto.md: no
        negotiation state survives STARTTLS)."""
        if self.state != _TLS_HANDSHAKE:
            raise RuntimeError("tls_established() without a pending STARTTLS")
        self.tls_active = True
        self.structured = False
        self.meta_export = None
        self.meta_contexts = {}
        self.state = _OPTIONS

    def _decode_name(self, raw, option, fatal=False):
        try:
            if len(raw) > w.MAX_STRING or b"\0" in raw:
                raise ValueError("bad length or NUL")
            return raw.decode("utf-8")
        except ValueError as exc:
            if fatal:
                raise ProtocolError(
                    "bad export name in %s: %s" % (w.option_name(option), exc)
                ) from exc
            return None

    def _opt_info_go(self, option, data):
        if len(data) < 6:
            return self._error(option, w.REP_ERR_INVALID, "option data too short")
        (name_len,) = w.U32.unpack_from(data, 0)
        if name_len > len(data) - 6:
            return self._error(option, w.REP_ERR_INVALID, "export name length exceeds option data")
        name = self._decode_name(data[4 : 4 + name_len], option)
        if name is None:
            return self._error(option, w.REP_ERR_INVALID, "export name is not a valid string")
        (count,) = w.U16.unpack_from(data, 4 + name_len)
        rest = data[6 + name_len :]
        if len(rest) != 2 * count:
            return self._error(option, w.REP_ERR_INVALID, "information request count mismatch")
        infos = [w.U16.unpack_from(rest, 2 * i)[0] for i in range(count)]
        return self._expect_export(ExportRequest(option, name, infos))

    def _expect_export(self, event):
        self._pending_export = event
        return event

    def _parse_meta(self, option, data):
        """-> (export name, [queries]) or an error reply event."""
        pos = 0
        try:
            (name_len,) = w.U32.unpack_from(data, pos)
            pos += 4
            if name_len > len(data) - pos:
                raise ValueError("export name length exceeds option data")
            name = self._decode_name(data[pos : pos + name_len], option)
            if name is None:
                raise ValueError("export name is not a valid string")
            pos += name_len
            (count,) = w.U32.unpack_from(data, pos)
            pos += 4
            if count > w.MAX_META_QUERIES:
                return self._error(option, w.REP_ERR_TOO_BIG, "too many queries (%d)" % count)
            queries = []
            for _ in range(count):
                (qlen,) = w.U32.unpack_from(data, pos)
                pos += 4
                if qlen > len(data) - pos or qlen > w.MAX_STRING:
                    raise ValueError("query length exceeds option data")
                query = data[pos : pos + qlen].decode("utf-8")
                pos += qlen
                if ":" not in query:
                    raise ValueError("query %r has no namespace" % query)
                queries.append(query)
            if pos != len(data):
                raise ValueError("%d trailing bytes" % (len(data) - pos))
        except (struct.error, ValueError) as exc:
            return self._error(
                option, w.REP_ERR_INVALID, "bad %s: %s" % (w.option_name(option), exc)
            )
        return name, queries

    def _opt_meta_context(self, option, data):
        if option == w.OPT_SET_META_CONTEXT:
            # proto.md: the selection is replaced even when the option fails.
            self.meta_contexts = {}
            self.meta_export = None
        if not self.structured:
            return self._error(option, w.REP_ERR_INVALID, "negotiate structured replies first")
        parsed = self._parse_meta(option, data)
        if isinstance(parsed, Event):
            return parsed
        name, queries = parsed
        selected = []
        if option == w.OPT_LIST_META_CONTEXT:
            if not queries:
                selected = list(w.CONTEXT_IDS)
            for query in queries:
                for ctx in w.CONTEXT_IDS:
                    namespace = ctx.split(":", 1)[0] + ":"
                    if (query == ctx or query == namespace) and ctx not in selected:
                        selected.append(ctx)
            replies = [w.meta_context_reply(option, 0, ctx) for ctx in selected]
        else:
            for query in queries:
                if query in w.CONTEXT_IDS and query not in selected:
                    selected.append(query)
            self.meta_export = name
            self.meta_contexts = {w.CONTEXT_IDS[ctx]: ctx for ctx in selected}
            replies = [w.meta_context_reply(option, w.CONTEXT_IDS[ctx], ctx) for ctx in selected]
        replies.append(w.option_reply(option, w.REP_ACK))
        return SendReply(option, b"".join(replies))

    # -- answers from the I/O layer ----------------------------------------------------------------

    def list_reply(self, names):
        """Bytes answering NBD_OPT_LIST."""
        out = [w.server_reply(name) for name in names]
        out.append(w.option_reply(w.OPT_LIST, w.REP_ACK))
        return b"".join(out)

    def accept_export(self, size, description=None, block_size=None):
        """Bytes accepting the pending ExportRequest. After EXPORT_NAME or GO the connection is
        in transmission. block_size: the export's own block size, advertised as the preferred
        block size of NBD_INFO_BLOCK_SIZE (default PREFERRED_BLOCK_SIZE)."""
        event = self._pending_export
        if event is None:
            raise RuntimeError("no pending ExportRequest")
        self._pending_export = None
        flags = w.FLAG_HAS_FLAGS | w.FLAG_READ_ONLY | w.FLAG_CAN_MULTI_CONN
        if self.structured:
            flags |= w.FLAG_SEND_DF
        if event.option == w.OPT_EXPORT_NAME:
            self._enter_transmission(event.name, size, flags)
            return w.export_name_reply(size, flags, self.no_zeroes)
        option = event.option
        max_block = min(w.MAX_BLOCK_SIZE, self.max_request_length)
        preferred = preferred_block_size(block_size, max_block)
        replies = [
            w.info_reply(option, w.INFO_EXPORT, w.U64.pack(size) + w.U16.pack(flags)),
            w.info_reply(
                option,
                w.INFO_BLOCK_SIZE,
                w.BLOCK_SIZES.pack(w.MIN_BLOCK_SIZE, preferred, max_block),
            ),
        ]
        if w.INFO_NAME in event.info_requests:
            replies.append(w.info_reply(option, w.INFO_NAME, event.name.encode()))
        if w.INFO_DESCRIPTION in event.info_requests and description:
            replies.append(w.info_reply(option, w.INFO_DESCRIPTION, w.encode_string(description)))
        replies.append(w.option_reply(option, w.REP_ACK))
        if option == w.OPT_GO:
            self._enter_transmission(event.name, size, flags)
        return b"".join(replies)

    def reject_export(self, reply_type=w.REP_ERR_UNKNOWN, message="unknown export"):
        """Bytes refusing the pending ExportRequest (INFO/GO). EXPORT_NAME cannot be refused:
        this raises ProtocolError and the I/O layer closes the connection."""
        event = self._pending_export
        if event is None:
            raise RuntimeError("no pending ExportRequest")
        self._pending_export = None
        if event.option == w.OPT_EXPORT_NAME:
            self.state = _CLOSED
            raise ProtocolError("NBD_OPT_EXPORT_NAME refused: %s" % message)
        return w.option_error(event.option, reply_type, message)

    def _enter_transmission(self, name, size, flags):
        self.export_name = name
        self.export_size = size
        self.transmission_flags = flags
        if self.meta_export != name:
            self.meta_contexts = {}
        self.state = _TRANSMISSION

    # -- transmission ------------------------------------------------------------------------------

    def _next_request(self):
        if self._skip_write:
            n = min(self._skip_write, len(self._buf))
            del self._buf[:n]
            self._skip_write -= n
            if self._skip_write:
                return None
        if len(self._buf) < w.REQUEST.size:
            return None
        magic, flags, cmd, handle, offset, length = w.REQUEST.unpack_from(self._buf)
        if magic != w.REQUEST_MAGIC:
            raise ProtocolError("bad request magic 0x%08x" % magic)
        del self._buf[: w.REQUEST.size]
        request = Request(handle, cmd, flags, offset, length)
        if cmd == w.CMD_DISC:
            self.state = _CLOSED
            del self._buf[:]
            return Disconnect()
        if cmd == w.CMD_WRITE:
            if length > self.max_request_length:
                raise ProtocolError("WRITE payload of %d bytes exceeds the limit" % length)
            self._skip_write = length
            return InvalidRequest(request, RequestError(w.EPERM, "export is read-only"))
        try:
            self._check_request(request)
        except RequestError as exc:
            return InvalidRequest(request, exc)
        return request

    def _check_request(self, r):
        if r.type in (w.CMD_TRIM, w.CMD_WRITE_ZEROES, w.CMD_RESIZE):
            raise RequestError(w.EPERM, "export is read-only (%s refused)" % r.name)
        allowed = {
            w.CMD_READ: w.CMD_FLAG_DF if self.structured else 0,
            w.CMD_BLOCK_STATUS: w.CMD_FLAG_REQ_ONE,
            w.CMD_FLUSH: 0,
            w.CMD_CACHE: 0,
        }
        if r.type not in allowed:
            raise RequestError(w.EINVAL, "unknown command %d" % r.type)
        if r.flags & ~allowed[r.type]:
            raise RequestError(w.EINVAL, "bad flags 0x%04x for %s" % (r.flags, r.name))
        if r.type == w.CMD_FLUSH:
            if r.offset or r.length:
                raise RequestError(w.EINVAL, "FLUSH offset and length must be zero")
            return
        if r.offset + r.length > self.export_size:
            raise RequestError(
                w.EINVAL,
                "%s [%d, +%d) is past the end of the export (%d bytes)"
                % (r.name, r.offset, r.length, self.export_size),
            )
        if r.type in (w.CMD_READ, w.CMD_CACHE) and r.length > self.max_request_length:
            raise RequestError(
                w.EINVAL, "%s length %d exceeds %d" % (r.name, r.length, self.max_request_length)
            )
        if r.type == w.CMD_BLOCK_STATUS:
            if not self.structured or not self.meta_contexts:
                raise RequestError(w.EINVAL, "BLOCK_STATUS without a selected metadata context")
            if r.length == 0:
                raise RequestError(w.EINVAL, "BLOCK_STATUS of length 0")

    def error_reply(self, handle, error, message=""):
        """Bytes failing one request (structured error chunk when negotiated)."""
        if self.structured:
            return w.error_chunk(handle, error, message, done=True)
        return w.simple_reply(handle, error)
