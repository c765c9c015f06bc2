"""NBD wire format (fixed newstyle): the numbers of proto.md and the bytes of every reply.

What lives here: magics, handshake and transmission flags, option / reply / info / command numbers,
error codes, block status flags, the metadata contexts we serve, our limits, and pure functions that
build each reply (no state, no I/O). The state machine that decides which reply to send is
agent.nbd.protocol; the sockets are agent.nbd.server, agent.nbd.connection and agent.nbd.transport.

Three header layouts, each built by one function that the others call:

- option reply (handshake):   option_reply(option, reply_type, data)
- simple reply (transmission): simple_reply(handle, error); a successful READ's data follows
- structured reply chunk:      chunk_header(handle, reply_type, length, done) + payload

References: NetworkBlockDevice/nbd doc/proto.md.
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

# --- Layouts (big-endian, as proto.md) -----------------------------------------------------------

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")  # client option: IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, data length
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
HOLE = struct.Struct(">QI")  # OFFSET_HOLE payload: offset, size
BLOCK_SIZES = struct.Struct(">III")  # NBD_INFO_BLOCK_SIZE payload: minimum, preferred, maximum
DESCRIPTOR = struct.Struct(">II")


def encode_string(text, errors="strict"):
    """UTF-8 bytes of a message or name, cut to the spec's MAX_STRING."""
    return text.encode("utf-8", errors)[:MAX_STRING]


def option_name(option):
    return "NBD_OPT_" + OPTION_NAMES.get(option, str(option))


# --- Handshake replies ----------------------------------------------------------------------------


def greeting():
    """The server's first bytes: NBDMAGIC, IHAVEOPT, handshake flags."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option, reply_type, data=b""):
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option, reply_type, message):
    """An option's error reply (REP_ERR_*) carrying a human-readable message."""
    return option_reply(option, reply_type, encode_string(message))


def server_reply(name):
    """One NBD_REP_SERVER entry of an NBD_OPT_LIST answer."""
    raw = name.encode("utf-8")
    return option_reply(OPT_LIST, REP_SERVER, U32.pack(len(raw)) + raw)


def info_reply(option, info_type, payload):
    """One NBD_REP_INFO of an NBD_OPT_INFO / GO answer."""
    return option_reply(option, REP_INFO, U16.pack(info_type) + payload)


def meta_context_reply(option, context_id, name):
    """One NBD_REP_META_CONTEXT (context_id 0 in a LIST_META_CONTEXT answer)."""
    return option_reply(option, REP_META_CONTEXT, U32.pack(context_id) + name.encode())


def export_name_reply(size, flags, no_zeroes):
    """The answer to NBD_OPT_EXPORT_NAME (no option reply header: size, flags, padding)."""
    return U64.pack(size) + U16.pack(flags) + (b"" if no_zeroes else b"\0" * 124)


# --- Transmission replies -------------------------------------------------------------------------


def simple_reply(handle, error=0):
    """Simple reply header; for a successful READ the data follows."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(handle, reply_type, length, done=False):
    """Structured reply chunk header; `length` payload bytes follow."""
    flags = REPLY_FLAG_DONE if done else 0
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, length)


def chunk(handle, reply_type, payload=b"", done=False):
    return chunk_header(handle, reply_type, len(payload), done) + payload


def offset_data_header(handle, offset, data_length, done=False):
    """OFFSET_DATA chunk header + offset; the caller sends `data_length` bytes after it
    (with os.sendfile when it can)."""
    if data_length < 1:
        raise ValueError("OFFSET_DATA must carry at least one byte")
    header = chunk_header(handle, REPLY_TYPE_OFFSET_DATA, data_length + 8, done)
    return header + U64.pack(offset)


def offset_hole(handle, offset, size, done=False):
    if not 0 < size < 1 << 32:
        raise ValueError("hole size must be in 1..2^32-1, got %d" % size)
    return chunk(handle, REPLY_TYPE_OFFSET_HOLE, HOLE.pack(offset, size), done)


def none_chunk(handle):
    return chunk(handle, REPLY_TYPE_NONE, b"", done=True)


def error_chunk(handle, error, message="", done=True):
    msg = encode_string(message, "replace")
    return chunk(handle, REPLY_TYPE_ERROR, U32.pack(error) + U16.pack(len(msg)) + msg, done)


def block_status_chunk(handle, context_id, descriptors, done=False):
    """descriptors: [(length, flags)], lengths nonzero."""
    if not descriptors:
        raise ValueError("block status needs at least one descriptor")
    parts = [U32.pack(context_id)]
    for length, flags in descriptors:
        if not 0 < length < 1 << 32:
            raise ValueError("descriptor length out of range: %d" % length)
        parts.append(DESCRIPTOR.pack(length, flags))
    return chunk(handle, REPLY_TYPE_BLOCK_STATUS, b"".join(parts), done)
