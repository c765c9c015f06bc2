"""Sans-IO NBD server: bytes in, events out, bytes back (fixed newstyle only).

The state machine never touches a socket. The I/O layer (agent.nbd.server) does::

    conn = ServerConnection(tls_mode="require")
    send(conn.greeting())
    while True:
        conn.feed(recv())
        for event in iter(conn.next_event, None):
            ...   # answer with conn.accept_export(...), reply builders below, etc.

Two kinds of failure, as in ovirt-imageio's nbd.py:

- ProtocolError: the peer broke the protocol (bad magic, unknown client flags, oversized option,
  bytes after STARTTLS, ...). The connection cannot continue: close it.
- RequestError: one transmission request is invalid (out of range, bad flags, write on a read-only
  export, ...). It is answered with an error and the connection goes on.

What this server offers (proto.md asks servers to document their metadata contexts):

- Export names are ticket ids. Exports are read-only; transmission flags HAS_FLAGS, READ_ONLY,
  CAN_MULTI_CONN, and SEND_DF once structured replies are negotiated.
- NBD_INFO_BLOCK_SIZE: minimum 1 (any alignment is served), preferred 2 MiB (one VHD block),
  maximum 32 MiB (larger READ/CACHE requests fail with EINVAL; a larger WRITE payload closes).
- `base:allocation`: HOLE|ZERO where no file of the chain holds the sectors, 0 elsewhere.
- `fastpath:changed`: bit 0 set on the 2 MiB blocks that differ from the ticket's base VDI (blocks
  allocated in the chain above the base); without a base, on every allocated block. Queries:
  `fastpath:changed`, or `fastpath:` (all fastpath contexts) in LIST_META_CONTEXT.
- WRITE, TRIM, WRITE_ZEROES, RESIZE -> EPERM; FLUSH and CACHE succeed and do nothing; unknown
  commands and flags -> EINVAL.
- TLS modes: off (STARTTLS -> ERR_POLICY), optional (SELECTIVETLS with no TLS-only export), require
  (FORCEDTLS: everything but STARTTLS and ABORT -> ERR_TLS_REQD; EXPORT_NAME closes).

References: NetworkBlockDevice/nbd doc/proto.md (option haggling, structured replies, block status,
TLS modes, block size constraints).
"""

import struct

# --- Magics -------------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- Handshake flags ------------------------------------------------------------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# --- Transmission flags ---------------------------------------------------------------------------

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# --- Options --------------------------------------------------------------------------------------

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- Transmission ---------------------------------------------------------------------------------

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_CHANGED = 1 << 0  # fastpath:changed: bit 0 = the block differs from the ticket's base

# --- Metadata contexts ----------------------------------------------------------------------------

CONTEXT_ALLOCATION = "base:allocation"
CONTEXT_CHANGED = "fastpath:changed"
# Context ids are opaque to clients; fixed ones keep the server simple.
CONTEXT_IDS = {CONTEXT_ALLOCATION: 1, CONTEXT_CHANGED: 2}
CONTEXT_NAMES = {v: k for k, v in CONTEXT_IDS.items()}

# --- Limits ---------------------------------------------------------------------------------------

MAX_STRING = 4096  # proto.md: strings MUST be no longer than 4096 bytes
MAX_OPTION_DATA = 16 * 1024  # larger option payloads end the connection (denial of service)
MAX_OPTIONS = 1024  # options per connection before we call it a denial of service
MAX_REQUEST_LENGTH = 32 * 1024 * 1024  # READ/WRITE/CACHE length limit (advertised maximum)
MAX_META_QUERIES = 16
MIN_BLOCK_SIZE = 1  # we serve any alignment (the spec's default)
PREFERRED_BLOCK_SIZE = 2 * 1024 * 1024  # one VHD block
MAX_BLOCK_SIZE = MAX_REQUEST_LENGTH

TLS_MODES = ("off", "optional", "require")

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_OFFSET_DATA = struct.Struct(">IHHQIQ")
_OFFSET_HOLE = struct.Struct(">IHHQIQI")
_DESCRIPTOR = struct.Struct(">II")

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}
COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
    CMD_RESIZE: "RESIZE",
}


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed."""


class RequestError(Exception):
    """One request fails with an NBD error code; the connection continues."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


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
        return COMMAND_NAMES.get(self.type, "CMD_%d" % self.type)


class InvalidRequest(Event):
    """A transmission request that fails: answer with conn.error_reply(request.handle, error)."""

    __slots__ = ("request", "error")

    def __init__(self, request, error):
        self.request = request
        self.error = error


class Disconnect(Event):
    """NBD_CMD_DISC: finish in-flight requests, then close."""

    __slots__ = ()


# --- Reply builders (pure functions) ------------------------------------------------------------


def option_reply(option, reply_type, data=b""):
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def simple_reply(handle, error=0):
    """Simple reply header; for a successful READ the data follows."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk(handle, reply_type, payload=b"", done=False):
    flags = REPLY_FLAG_DONE if done else 0
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, len(payload)) + payload


def offset_data_header(handle, offset, data_length, done=False):
    """OFFSET_DATA chunk header + offset; the caller sends `data_length` bytes after it
    (with os.sendfile when it can)."""
    if data_length < 1:
        raise ValueError("OFFSET_DATA must carry at least one byte")
    flags = REPLY_FLAG_DONE if done else 0
    return _OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, handle, data_length + 8, offset
    )


def offset_hole(handle, offset, size, done=False):
    if not 0 < size < 1 << 32:
        raise ValueError("hole size must be in 1..2^32-1, got %d" % size)
    flags = REPLY_FLAG_DONE if done else 0
    return _OFFSET_HOLE.pack(
        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12, offset, size
    )


def none_chunk(handle):
    return chunk(handle, REPLY_TYPE_NONE, b"", done=True)


def error_chunk(handle, error, message="", done=True):
    msg = message.encode("utf-8", "replace")[:MAX_STRING]
    return chunk(handle, REPLY_TYPE_ERROR, _U32.pack(error) + _U16.pack(len(msg)) + msg, done)


def block_status_chunk(handle, context_id, descriptors, done=False):
    """descriptors: [(length, flags)], lengths nonzero."""
    if not descriptors:
        raise ValueError("block status needs at least one descriptor")
    parts = [_U32.pack(context_id)]
    for length, flags in descriptors:
        if not 0 < length < 1 << 32:
            raise ValueError("descriptor length out of range: %d" % length)
        parts.append(_DESCRIPTOR.pack(length, flags))
    return chunk(handle, REPLY_TYPE_BLOCK_STATUS, b"".join(parts), done)


# --- The state machine ----------------------------------------------------------------------------

_CLIENT_FLAGS = "client_flags"
_OPTIONS = "options"
_TLS_HANDSHAKE = "tls_handshake"
_TRANSMISSION = "transmission"
_CLOSED = "closed"


class ServerConnection(object):
    """One NBD server connection, from greeting to disconnect, without I/O."""

    def __init__(self, tls_mode="off", max_request_length=MAX_REQUEST_LENGTH):
        if tls_mode not in TLS_MODES:
            raise ValueError("tls_mode must be one of %s, got %r" % (TLS_MODES, tls_mode))
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
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

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
                (flags,) = _U32.unpack(self._take(4))
                if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                    raise ProtocolError("unknown client flags 0x%08x" % flags)
                if not flags & FLAG_C_FIXED_NEWSTYLE:
                    raise ProtocolError("client does not speak fixed newstyle (flags 0x%x)" % flags)
                self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
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
        if len(self._buf) < _OPTION_HEADER.size:
            return None
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise ProtocolError("bad option magic 0x%016x" % magic)
        if length > MAX_OPTION_DATA:
            raise ProtocolError(
                "option %s data length %d exceeds %d" % (_opt_name(option), length, MAX_OPTION_DATA)
            )
        if len(self._buf) < _OPTION_HEADER.size + length:
            return None
        del self._buf[: _OPTION_HEADER.size]
        data = self._take(length)
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            raise ProtocolError("more than %d options: denial of service" % MAX_OPTIONS)
        return self._handle_option(option, data)

    def _reply(self, option, reply_type, data=b""):
        return SendReply(option, option_reply(option, reply_type, data))

    def _error(self, option, reply_type, message):
        return self._reply(option, reply_type, message.encode("utf-8")[:MAX_STRING])

    def _tls_required(self):
        return self.tls_mode == "require" and not self.tls_active

    def _handle_option(self, option, data):
        if option == OPT_ABORT:
            return AbortRequest(option_reply(option, REP_ACK))
        if option == OPT_STARTTLS:
            return self._opt_starttls(data)
        if self._tls_required():
            if option == OPT_EXPORT_NAME:
                raise ProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS while TLS is required")
            return self._error(option, REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
        if option == OPT_EXPORT_NAME:
            name = self._decode_name(data, option, fatal=True)
            return self._expect_export(ExportRequest(option, name))
        if option in (OPT_INFO, OPT_GO):
            return self._opt_info_go(option, data)
        if option == OPT_LIST:
            if data:
                return self._error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return ListRequest()
        if option == OPT_STRUCTURED_REPLY:
            if data:
                return self._error(
                    option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"
                )
            if self.structured:
                return self._error(option, REP_ERR_INVALID, "structured replies already negotiated")
            self.structured = True
            return self._reply(option, REP_ACK)
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            return self._opt_meta_context(option, data)
        return self._error(option, REP_ERR_UNSUP, "option %s not supported" % _opt_name(option))

    def _opt_starttls(self, data):
        option = OPT_STARTTLS
        if self.tls_mode == "off":
            return self._error(option, REP_ERR_POLICY, "TLS is not enabled on this server")
        if data:
            return self._error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            return self._error(option, REP_ERR_INVALID, "TLS is already active")
        if self._buf:
            raise ProtocolError("client sent data after NBD_OPT_STARTTLS before the reply")
        self.state = _TLS_HANDSHAKE
        return StartTLS(option_reply(option, REP_ACK))

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
            if len(raw) > MAX_STRING or b"\0" in raw:
                raise ValueError("bad length or NUL")
            return raw.decode("utf-8")
        except ValueError as exc:
            if fatal:
                raise ProtocolError("bad export name in %s: %s" % (_opt_name(option), exc)) from exc
            return None

    def _opt_info_go(self, option, data):
        if len(data) < 6:
            return self._error(option, REP_ERR_INVALID, "option data too short")
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > len(data) - 6:
            return self._error(option, REP_ERR_INVALID, "export name length exceeds option data")
        name = self._decode_name(data[4 : 4 + name_len], option)
        if name is None:
            return self._error(option, REP_ERR_INVALID, "export name is not a valid string")
        (count,) = _U16.unpack_from(data, 4 + name_len)
        rest = data[6 + name_len :]
        if len(rest) != 2 * count:
            return self._error(option, REP_ERR_INVALID, "information request count mismatch")
        infos = [_U16.unpack_from(rest, 2 * i)[0] for i in range(count)]
        return self._expect_export(ExportRequest(option, name, infos))

    def _expect_export(self, event):
        self._pending_export = event
        return event

    def _parse_meta(self, option, data):
        """-> (export name, [queries]) or an error reply event."""
        pos = 0
        try:
            (name_len,) = _U32.unpack_from(data, pos)
            pos += 4
            if name_len > len(data) - pos:
                raise ValueError("export name length exceeds option data")
            name = self._decode_name(data[pos : pos + name_len], option)
            if name is None:
                raise ValueError("export name is not a valid string")
            pos += name_len
            (count,) = _U32.unpack_from(data, pos)
            pos += 4
            if count > MAX_META_QUERIES:
                return self._error(option, REP_ERR_TOO_BIG, "too many queries (%d)" % count)
            queries = []
            for _ in range(count):
                (qlen,) = _U32.unpack_from(data, pos)
                pos += 4
                if qlen > len(data) - pos or qlen > MAX_STRING:
                    raise ValueError("query length exceeds option data")
                query = data[pos : pos + qlen].decode("utf-8")
                pos += qlen
                if ":" not in query:
                    raise ValueError("query %r has no namespace" % query)
                queries.append(query)
            if pos != len(data):
                raise ValueError("%d trailing bytes" % (len(data) - pos))
        except (struct.error, ValueError) as exc:
            return self._error(option, REP_ERR_INVALID, "bad %s: %s" % (_opt_name(option), exc))
        return name, queries

    def _opt_meta_context(self, option, data):
        if option == OPT_SET_META_CONTEXT:
            # proto.md: the selection is replaced even when the option fails.
            self.meta_contexts = {}
            self.meta_export = None
        if not self.structured:
            return self._error(option, REP_ERR_INVALID, "negotiate structured replies first")
        parsed = self._parse_meta(option, data)
        if isinstance(parsed, Event):
            return parsed
        name, queries = parsed
        selected = []
        if option == OPT_LIST_META_CONTEXT:
            if not queries:
                selected = list(CONTEXT_IDS)
            for query in queries:
                for ctx in CONTEXT_IDS:
                    namespace = ctx.split(":", 1)[0] + ":"
                    if (query == ctx or query == namespace) and ctx not in selected:
                        selected.append(ctx)
            replies = [
                option_reply(option, REP_META_CONTEXT, _U32.pack(0) + ctx.encode())
                for ctx in selected
            ]
        else:
            for query in queries:
                if query in CONTEXT_IDS and query not in selected:
                    selected.append(query)
            self.meta_export = name
            self.meta_contexts = {CONTEXT_IDS[ctx]: ctx for ctx in selected}
            replies = [
                option_reply(option, REP_META_CONTEXT, _U32.pack(CONTEXT_IDS[ctx]) + ctx.encode())
                for ctx in selected
            ]
        replies.append(option_reply(option, REP_ACK))
        return SendReply(option, b"".join(replies))

    # -- answers from the I/O layer ----------------------------------------------------------------

    def list_reply(self, names):
        """Bytes answering NBD_OPT_LIST."""
        out = []
        for name in names:
            raw = name.encode("utf-8")
            out.append(option_reply(OPT_LIST, REP_SERVER, _U32.pack(len(raw)) + raw))
        out.append(option_reply(OPT_LIST, REP_ACK))
        return b"".join(out)

    def accept_export(self, size, description=None):
        """Bytes accepting the pending ExportRequest. After EXPORT_NAME or GO the connection is
        in transmission."""
        event = self._pending_export
        if event is None:
            raise RuntimeError("no pending ExportRequest")
        self._pending_export = None
        flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN
        if self.structured:
            flags |= FLAG_SEND_DF
        if event.option == OPT_EXPORT_NAME:
            self._enter_transmission(event.name, size, flags)
            return _U64.pack(size) + _U16.pack(flags) + (b"" if self.no_zeroes else b"\0" * 124)
        option = event.option
        replies = [
            option_reply(
                option, REP_INFO, _U16.pack(INFO_EXPORT) + _U64.pack(size) + _U16.pack(flags)
            )
        ]
        replies.append(
            option_reply(
                option,
                REP_INFO,
                _U16.pack(INFO_BLOCK_SIZE)
                + _U32.pack(MIN_BLOCK_SIZE)
                + _U32.pack(PREFERRED_BLOCK_SIZE)
                + _U32.pack(min(MAX_BLOCK_SIZE, self.max_request_length)),
            )
        )
        if INFO_NAME in event.info_requests:
            replies.append(
                option_reply(option, REP_INFO, _U16.pack(INFO_NAME) + event.name.encode())
            )
        if INFO_DESCRIPTION in event.info_requests and description:
            desc = description.encode("utf-8")[:MAX_STRING]
            replies.append(option_reply(option, REP_INFO, _U16.pack(INFO_DESCRIPTION) + desc))
        replies.append(option_reply(option, REP_ACK))
        if option == OPT_GO:
            self._enter_transmission(event.name, size, flags)
        return b"".join(replies)

    def reject_export(self, reply_type=REP_ERR_UNKNOWN, message="unknown export"):
        """Bytes refusing the pending ExportRequest (INFO/GO). EXPORT_NAME cannot be refused:
        this raises ProtocolError and the I/O layer closes the connection."""
        event = self._pending_export
        if event is None:
            raise RuntimeError("no pending ExportRequest")
        self._pending_export = None
        if event.option == OPT_EXPORT_NAME:
            self.state = _CLOSED
            raise ProtocolError("NBD_OPT_EXPORT_NAME refused: %s" % message)
        return option_reply(event.option, reply_type, message.encode("utf-8")[:MAX_STRING])

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
        if len(self._buf) < _REQUEST.size:
            return None
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(self._buf)
        if magic != REQUEST_MAGIC:
            raise ProtocolError("bad request magic 0x%08x" % magic)
        del self._buf[: _REQUEST.size]
        request = Request(handle, cmd, flags, offset, length)
        if cmd == CMD_DISC:
            self.state = _CLOSED
            del self._buf[:]
            return Disconnect()
        if cmd == CMD_WRITE:
            if length > self.max_request_length:
                raise ProtocolError("WRITE payload of %d bytes exceeds the limit" % length)
            self._skip_write = length
            return InvalidRequest(request, RequestError(EPERM, "export is read-only"))
        try:
            self._check_request(request)
        except RequestError as exc:
            return InvalidRequest(request, exc)
        return request

    def _check_request(self, r):
        if r.type in (CMD_TRIM, CMD_WRITE_ZEROES, CMD_RESIZE):
            raise RequestError(EPERM, "export is read-only (%s refused)" % r.name)
        allowed = {
            CMD_READ: CMD_FLAG_DF if self.structured else 0,
            CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
            CMD_FLUSH: 0,
            CMD_CACHE: 0,
        }
        if r.type not in allowed:
            raise RequestError(EINVAL, "unknown command %d" % r.type)
        if r.flags & ~allowed[r.type]:
            raise RequestError(EINVAL, "bad flags 0x%04x for %s" % (r.flags, r.name))
        if r.type == CMD_FLUSH:
            if r.offset or r.length:
                raise RequestError(EINVAL, "FLUSH offset and length must be zero")
            return
        if r.offset + r.length > self.export_size:
            raise RequestError(
                EINVAL,
                "%s [%d, +%d) is past the end of the export (%d bytes)"
                % (r.name, r.offset, r.length, self.export_size),
            )
        if r.type in (CMD_READ, CMD_CACHE) and r.length > self.max_request_length:
            raise RequestError(
                EINVAL, "%s length %d exceeds %d" % (r.name, r.length, self.max_request_length)
            )
        if r.type == CMD_BLOCK_STATUS:
            if not self.structured or not self.meta_contexts:
                raise RequestError(EINVAL, "BLOCK_STATUS without a selected metadata context")
            if r.length == 0:
                raise RequestError(EINVAL, "BLOCK_STATUS of length 0")

    def error_reply(self, handle, error, message=""):
        """Bytes failing one request (structured error chunk when negotiated)."""
        if self.structured:
            return error_chunk(handle, error, message, done=True)
        return simple_reply(handle, error)


def _opt_name(option):
    return "NBD_OPT_" + OPTION_NAMES.get(option, str(option))
