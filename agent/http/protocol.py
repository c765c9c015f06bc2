"""Sans-IO pieces of the agent's HTTP API: request parsing, ranges, response framing, blocks framing.

Nothing here touches a socket: bytes go in, requests (or typed errors) come out, and response heads and
stream frames come back as bytes. The rest of agent/http/ is the thin socket layer around it:
connection.py feeds RequestParser, response.py sends response_head() and json_body(), views.py
frames the blocks stream with BlocksEncoder; the orchestrator reads that stream back with
BlocksDecoder. The parser's bounds are limits.Limits.

The parser is deliberately strict (the agent faces whatever reaches dom0's network): HTTP/1.0 and 1.1
only, request line and header block bounded, no obsolete line folding, no request bodies, a single Host.
Errors that end the connection (ProtocolError: the byte stream can no longer be trusted) are distinct
from errors that fail one request (RequestError), as in ovirt-imageio's nbd.py.
"""

import json
import re
import struct
import zlib
from urllib.parse import parse_qs, unquote

from agent.http.limits import Limits

REASONS = {
    200: "OK",
    206: "Partial Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    413: "Payload Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """An error answered to the client as JSON {"error": code, "message": text} with a status."""

    status = 500
    code = "internal_error"

    def __init__(self, message, status=None, code=None, headers=None):
        Exception.__init__(self, message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = list(headers or [])

    def body(self):
        return json_body({"error": self.code, "message": self.message})


class ProtocolError(HttpError):
    """The request stream is broken: answer (when possible) and close the connection."""

    status = 400
    code = "bad_request"


class RequestError(HttpError):
    """One request failed; the connection may serve the next one."""

    status = 400
    code = "bad_request"


# RFC 9110 token characters for methods and header names.
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Header values: visible ASCII, obs-text, space and tab; no CR, LF or NUL.
_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")


class Request(object):
    """One parsed request head."""

    def __init__(self, method, target, version, headers):
        self.method = method  # str, e.g. "GET"
        self.target = target  # str, the raw request target
        self.version = version  # "HTTP/1.1" or "HTTP/1.0"
        self.headers = headers  # list of (lower-case name, value) str pairs, in order
        path, _, query = target.partition("?")
        self.raw_path = path
        self.path = unquote(path)
        self.query = parse_qs(query, keep_blank_values=True, strict_parsing=False)

    def header(self, name, default=None):
        """The value of header name (lower case); RequestError if it appears more than once."""
        found = [v for k, v in self.headers if k == name]
        if not found:
            return default
        if len(found) > 1:
            raise RequestError("header %r appears more than once" % name)
        return found[0]

    def param(self, name, default=None):
        """Query parameter name (single value); RequestError when repeated."""
        values = self.query.get(name)
        if not values:
            return default
        if len(values) > 1:
            raise RequestError("query parameter %r appears more than once" % name)
        return values[0]

    @property
    def keep_alive(self):
        conn = (self.header("connection", "") or "").lower()
        tokens = [t.strip() for t in conn.split(",")]
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


class RequestParser(object):
    """Accumulates bytes until one request head is complete.

    feed(data) returns a Request once the head (up to the blank line) has arrived, else None. Bytes after
    the head stay buffered (pipelining) and are parsed by the next feed(b"") call after reset().
    Raises ProtocolError for anything malformed or over the limits.
    """

    def __init__(self, limits=None):
        self.limits = limits or Limits()
        self._buf = bytearray()

    @property
    def buffered(self):
        return len(self._buf)

    def feed(self, data):
        if data:
            self._buf += data
        limits = self.limits
        # Tolerate (RFC 9112 section 2.2) a few empty lines before a request line.
        while self._buf[:2] == b"\r\n":
            del self._buf[:2]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            first = self._buf.find(b"\r\n")
            if first < 0 and len(self._buf) > limits.max_request_line:
                raise ProtocolError(
                    "request line longer than %d bytes" % limits.max_request_line,
                    status=414,
                    code="uri_too_long",
                )
            if b"\n" in self._buf and b"\r\n" not in self._buf:
                # A bare LF line ending: refuse rather than guess.
                raise ProtocolError("line ends with LF without CR")
            if len(self._buf) > limits.max_request_line + limits.max_header_bytes:
                raise ProtocolError(
                    "request head larger than %d bytes" % limits.max_header_bytes,
                    status=431,
                    code="headers_too_large",
                )
            return None
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        return self._parse_head(head)

    def _parse_head(self, head):
        limits = self.limits
        lines = head.split(b"\r\n")
        line = lines[0]
        if len(line) > limits.max_request_line:
            raise ProtocolError(
                "request line longer than %d bytes" % limits.max_request_line,
                status=414,
                code="uri_too_long",
            )
        if len(head) - len(line) > limits.max_header_bytes:
            raise ProtocolError(
                "header block larger than %d bytes" % limits.max_header_bytes,
                status=431,
                code="headers_too_large",
            )
        if len(lines) - 1 > limits.max_headers:
            raise ProtocolError(
                "more than %d header fields" % limits.max_headers,
                status=431,
                code="headers_too_large",
            )
        parts = line.split(b" ")
        if len(parts) != 3:
            raise ProtocolError("malformed request line")
        method, target, version = parts
        if not _TOKEN.match(method):
            raise ProtocolError("malformed method")
        if not _VERSION.match(version):
            if version.startswith(b"HTTP/"):
                raise ProtocolError(
                    "HTTP version not supported", status=505, code="version_not_supported"
                )
            raise ProtocolError("malformed HTTP version")
        if not _TARGET.match(target):
            raise ProtocolError("request target must be an absolute path")
        headers = []
        for raw in lines[1:]:
            if raw[:1] in (b" ", b"\t"):
                raise ProtocolError("obsolete header line folding")
            name, sep, value = raw.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise ProtocolError("malformed header field")
            value = value.strip(b" \t")
            if not _VALUE.match(value):
                raise ProtocolError("invalid character in header %r" % name.decode("ascii"))
            headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
        req = Request(
            method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers
        )
        hosts = [v for k, v in headers if k == "host"]
        if len(hosts) > 1 or (req.version == "HTTP/1.1" and not hosts):
            raise ProtocolError("HTTP/1.1 needs exactly one Host header")
        if any(k == "transfer-encoding" for k, _ in headers):
            raise ProtocolError("request bodies are not accepted (Transfer-Encoding)")
        lengths = [v for k, v in headers if k == "content-length"]
        if lengths and (len(lengths) > 1 or lengths[0] != "0"):
            raise ProtocolError("request bodies are not accepted (Content-Length)", status=413)
        return req


# ----------------------------------------------------------------------------------- ranges

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(value, size):
    """The single byte range asked by a Range header, as (start, end) with end exclusive.

    None when value is None (no Range header). Raises RequestError 416 (with Content-Range: bytes
    */size) when the range cannot be satisfied or asks for several ranges, and 400 when it is malformed.
    """
    if value is None:
        return None
    value = value.strip()
    unsat = [("Content-Range", "bytes */%d" % size)]
    if "," in value:
        raise RequestError(
            "multiple ranges are not supported",
            status=416,
            code="range_not_satisfiable",
            headers=unsat,
        )
    m = _RANGE.match(value)
    if not m or (not m.group(1) and not m.group(2)):
        raise RequestError("malformed Range header %r" % value[:64], code="bad_range")
    first, last = m.group(1), m.group(2)
    if len(first) > 20 or len(last) > 20:
        raise RequestError("Range value too large", code="bad_range")
    if first:
        start = int(first)
        end = int(last) + 1 if last else size
        if last and int(last) < start:
            raise RequestError("Range end before its start", code="bad_range")
        end = min(end, size)
        if start >= size:
            raise RequestError(
                "range starts at or past the end of the disk (%d bytes)" % size,
                status=416,
                code="range_not_satisfiable",
                headers=unsat,
            )
    else:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RequestError(
                "empty suffix range", status=416, code="range_not_satisfiable", headers=unsat
            )
        start = max(0, size - suffix)
        end = size
    return start, end


# --------------------------------------------------------------------------------- responses


JSON_TYPE = "application/json"


def json_body(obj):
    return (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8")


def json_item(obj):
    """One element of a JSON array, encoded as json_body() would encode it inside the array."""
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def response_head(status, headers, version="HTTP/1.1"):
    """The bytes of a response status line and headers (headers: list of (name, value))."""
    lines = ["%s %d %s" % (version, status, REASONS.get(status, "Unknown"))]
    for name, value in headers:
        value = str(value)
        if "\r" in value or "\n" in value:
            raise ValueError("header %s contains a line break" % name)
        lines.append("%s: %s" % (name, value))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk_header(length):
    return b"%x\r\n" % length


CHUNK_END = b"0\r\n\r\n"


# ----------------------------------------------------------------------- blocks stream framing
#
# See docs/http.md. All integers big-endian.
#
# stream header (40 bytes): magic "FPBLOCKS", version u32, flags u32, disk size u64, block size u32,
#                           first block u32, block count u32 (blocks covered by this stream), reserved u32
# frame header (16 bytes):  block index u32, flags u32, data length u32, reserved u32; data follows
# end frame:                frame header with index 0xFFFFFFFF and flags FRAME_END, length 24, then
#                           frame count u64, data bytes u64, CRC-32 u32 of every header byte sent
#                           before it (stream header + frame headers), reserved u32.

BLOCKS_MAGIC = b"FPBLOCKS"
BLOCKS_VERSION = 1
STREAM_CHANGED = 0x1  # stream flags: frames are the blocks that differ from the ticket's base

FRAME_ZERO = 0x1  # the block reads as zeros: no data follows
FRAME_END = 0x80000000
END_INDEX = 0xFFFFFFFF

_STREAM = struct.Struct(">8sIIQIIII")
_FRAME = struct.Struct(">IIII")
_END = struct.Struct(">QQII")
STREAM_HEADER_SIZE = _STREAM.size  # 40
FRAME_HEADER_SIZE = _FRAME.size  # 16
END_PAYLOAD_SIZE = _END.size  # 24


class BlocksFormatError(Exception):
    """A blocks stream that does not follow the framing (truncated, corrupt or out of order)."""


class BlocksEncoder(object):
    """Produces the framing bytes of a blocks stream; the caller sends data bytes between them."""

    def __init__(self, size, block_size, first, count, changed=False):
        self.frames = 0
        self.data_bytes = 0
        self._crc = 0
        self._head = _STREAM.pack(
            BLOCKS_MAGIC,
            BLOCKS_VERSION,
            STREAM_CHANGED if changed else 0,
            size,
            block_size,
            first,
            count,
            0,
        )

    def _track(self, b):
        self._crc = zlib.crc32(b, self._crc)
        return b

    def stream_header(self):
        return self._track(self._head)

    def frame(self, index, length, zero=False):
        if zero and length:
            raise ValueError("a zero frame carries no data")
        self.frames += 1
        self.data_bytes += length
        return self._track(_FRAME.pack(index, FRAME_ZERO if zero else 0, length, 0))

    def end(self):
        head = _FRAME.pack(END_INDEX, FRAME_END, END_PAYLOAD_SIZE, 0)
        crc = zlib.crc32(head, self._crc) & 0xFFFFFFFF
        return head + _END.pack(self.frames, self.data_bytes, crc, 0)

    @staticmethod
    def stream_length(frame_lengths):
        """Total stream bytes for frames with the given data lengths (zero frames: 0)."""
        n = 0
        total = 0
        for length in frame_lengths:
            n += 1
            total += length
        return (
            STREAM_HEADER_SIZE
            + n * FRAME_HEADER_SIZE
            + total
            + FRAME_HEADER_SIZE
            + END_PAYLOAD_SIZE
        )


class BlocksDecoder(object):
    """Parses a blocks stream fed in arbitrary pieces; used by tests and by the orchestrator.

    feed(data) returns a list of events: ("header", dict), ("block", index, flags, bytes) and finally
    ("end", dict). finish() raises BlocksFormatError unless the end frame was seen and checked.
    """

    def __init__(self, max_block=32 << 20):
        self._buf = bytearray()
        self._crc = 0
        self._state = "header"
        self._pending = None
        self._frames = 0
        self._data = 0
        self._last = -1
        self.max_block = max_block
        self.info = None
        self.done = False

    def feed(self, data):
        self._buf += data
        events = []
        while True:
            if self._state == "header":
                if len(self._buf) < STREAM_HEADER_SIZE:
                    break
                raw = bytes(self._buf[:STREAM_HEADER_SIZE])
                del self._buf[:STREAM_HEADER_SIZE]
                magic, version, flags, size, bsize, first, count, _ = _STREAM.unpack(raw)
                if magic != BLOCKS_MAGIC:
                    raise BlocksFormatError("bad magic %r" % magic)
                if version != BLOCKS_VERSION:
                    raise BlocksFormatError("unsupported version %d" % version)
                self._crc = zlib.crc32(raw)
                self.info = {
                    "flags": flags,
                    "changed": bool(flags & STREAM_CHANGED),
                    "size": size,
                    "block_size": bsize,
                    "first": first,
                    "count": count,
                }
                self._state = "frame"
                events.append(("header", self.info))
            elif self._state == "frame":
                if len(self._buf) < FRAME_HEADER_SIZE:
                    break
                raw = bytes(self._buf[:FRAME_HEADER_SIZE])
                index, flags, length, _ = _FRAME.unpack(raw)
                if flags & FRAME_END:
                    if index != END_INDEX or length != END_PAYLOAD_SIZE:
                        raise BlocksFormatError("malformed end frame")
                    if len(self._buf) < FRAME_HEADER_SIZE + END_PAYLOAD_SIZE:
                        break
                    crc = zlib.crc32(raw, self._crc) & 0xFFFFFFFF
                    payload = bytes(self._buf[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length])
                    del self._buf[: FRAME_HEADER_SIZE + length]
                    frames, data_bytes, want_crc, _ = _END.unpack(payload)
                    if frames != self._frames or data_bytes != self._data:
                        raise BlocksFormatError(
                            "end frame counts %d frames / %d bytes, received %d / %d"
                            % (frames, data_bytes, self._frames, self._data)
                        )
                    if want_crc != crc:
                        raise BlocksFormatError("header checksum mismatch")
                    self._state = "done"
                    self.done = True
                    events.append(("end", {"frames": frames, "data_bytes": data_bytes}))
                    continue
                if flags & ~FRAME_ZERO:
                    raise BlocksFormatError("unknown frame flags 0x%x" % flags)
                if flags & FRAME_ZERO and length:
                    raise BlocksFormatError("zero frame with data")
                if length > self.max_block or length > self.info["block_size"]:
                    raise BlocksFormatError("frame length %d larger than a block" % length)
                if index <= self._last:
                    raise BlocksFormatError("block %d out of order" % index)
                first, count = self.info["first"], self.info["count"]
                if not first <= index < first + count:
                    raise BlocksFormatError("block %d outside the stream's range" % index)
                if len(self._buf) < FRAME_HEADER_SIZE + length:
                    break
                data = bytes(self._buf[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length])
                del self._buf[: FRAME_HEADER_SIZE + length]
                self._crc = zlib.crc32(raw, self._crc)
                self._frames += 1
                self._data += length
                self._last = index
                events.append(("block", index, flags, data))
            else:
                if self._buf:
                    raise BlocksFormatError("%d bytes after the end frame" % len(self._buf))
                break
        return events

    def finish(self):
        if not self.done:
            raise BlocksFormatError("stream truncated (no end frame)")
