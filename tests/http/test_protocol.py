"""Unit tests of the sans-IO HTTP pieces: request parsing limits, ranges, blocks framing."""

import pytest

from agent.http import protocol as hp
from agent.http.limits import Limits


def parse(data, **limits):
    p = hp.RequestParser(Limits(**limits))
    return p.feed(data)


def test_parses_a_request_in_pieces_and_keeps_pipelined_bytes():
    p = hp.RequestParser()
    raw = b"GET /v1/exports/abc/raw?x=1&y=2 HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\n\r\nGET /healthz"
    for i in range(len(raw) - 30):
        assert p.feed(raw[i : i + 1]) is None
    req = p.feed(raw[len(raw) - 30 :])
    assert req.method == "GET"
    assert req.path == "/v1/exports/abc/raw"
    assert req.param("x") == "1"
    assert req.header("range") == "bytes=0-1"
    assert req.keep_alive
    assert p.buffered == len(b"GET /healthz")


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"GET / FTP/1.0\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: h\n\n", 400),
    ],
)
def test_malformed_requests_are_protocol_errors(raw, status):
    with pytest.raises(hp.ProtocolError) as ei:
        parse(raw)
    assert ei.value.status == status


def test_limits():
    with pytest.raises(hp.ProtocolError) as ei:
        parse(b"GET /" + b"a" * 200, max_request_line=100)
    assert ei.value.status == 414
    many = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20))
    with pytest.raises(hp.ProtocolError) as ei:
        parse(many + b"\r\n", max_headers=10)
    assert ei.value.status == 431
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 3000
    with pytest.raises(hp.ProtocolError) as ei:
        parse(big, max_header_bytes=1000, max_request_line=100)
    assert ei.value.status == 431
    with pytest.raises(hp.ProtocolError) as ei:
        parse(big + b"\r\n\r\n", max_header_bytes=1000)
    assert ei.value.status == 431


def test_keep_alive_rules():
    assert not parse(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").keep_alive


def test_repeated_header_or_param_is_a_request_error():
    req = parse(b"GET /?a=1&a=2 HTTP/1.1\r\nHost: h\r\nRange: a\r\nRange: b\r\n\r\n")
    with pytest.raises(hp.RequestError):
        req.header("range")
    with pytest.raises(hp.RequestError):
        req.param("a")


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("bytes=0-0", (0, 1)),
        ("bytes=0-", (0, 1000)),
        ("bytes=10-19", (10, 20)),
        ("bytes=990-5000", (990, 1000)),
        ("bytes=-10", (990, 1000)),
        ("bytes=-5000", (0, 1000)),
    ],
)
def test_ranges(value, expected):
    assert hp.parse_range(value, 1000) == expected


@pytest.mark.parametrize(
    "value, status",
    [
        ("bytes=1000-", 416),
        ("bytes=5000-6000", 416),
        ("bytes=-0", 416),
        ("bytes=0-1,5-6", 416),
        ("bytes=5-1", 400),
        ("items=0-1", 400),
        ("bytes=-", 400),
        ("bytes=a-b", 400),
        ("bytes=" + "9" * 30 + "-", 400),
    ],
)
def test_bad_ranges(value, status):
    with pytest.raises(hp.RequestError) as ei:
        hp.parse_range(value, 1000)
    assert ei.value.status == status
    if status == 416:
        assert ("Content-Range", "bytes */1000") in ei.value.headers


def test_response_head_refuses_header_injection():
    assert hp.response_head(200, [("A", "b")]) == b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"
    with pytest.raises(ValueError):
        hp.response_head(200, [("A", "b\r\nEvil: 1")])


def _stream(frames, first=0, count=8, changed=False):
    enc = hp.BlocksEncoder(8 * 4096, 4096, first, count, changed=changed)
    out = enc.stream_header()
    for index, data in frames:
        out += enc.frame(index, len(data or b""), zero=data is None) + (data or b"")
    out += enc.end()
    lengths = [len(d or b"") for _, d in frames]
    assert len(out) == hp.BlocksEncoder.stream_length(lengths)
    return out


def test_blocks_round_trip_fed_byte_by_byte():
    frames = [(1, b"a" * 4096), (3, None), (7, b"b" * 100)]
    raw = _stream(frames, changed=True)
    dec = hp.BlocksDecoder()
    events = []
    for i in range(len(raw)):
        events += dec.feed(raw[i : i + 1])
    dec.finish()
    assert events[0][0] == "header" and events[0][1]["changed"]
    blocks = [(e[1], e[2], e[3]) for e in events if e[0] == "block"]
    assert blocks == [(1, 0, b"a" * 4096), (3, hp.FRAME_ZERO, b""), (7, 0, b"b" * 100)]
    assert events[-1] == ("end", {"frames": 3, "data_bytes": 4196})


def test_blocks_truncation_and_corruption_detected():
    raw = _stream([(1, b"a" * 10), (2, b"b" * 10)])
    for cut in (0, 10, 40, 60, len(raw) - 1):
        dec = hp.BlocksDecoder()
        dec.feed(raw[:cut])
        with pytest.raises(hp.BlocksFormatError):
            dec.finish()
    # A dropped frame: counts no longer match the end frame.
    one = hp.STREAM_HEADER_SIZE + hp.FRAME_HEADER_SIZE + 10
    dropped = raw[: hp.STREAM_HEADER_SIZE] + raw[one:]
    with pytest.raises(hp.BlocksFormatError):
        hp.BlocksDecoder().feed(dropped)
    # A flipped index byte in a frame header: the header checksum catches it... or ordering does.
    bad = bytearray(raw)
    bad[hp.STREAM_HEADER_SIZE + 3] ^= 0x04
    with pytest.raises(hp.BlocksFormatError):
        hp.BlocksDecoder().feed(bytes(bad))
    with pytest.raises(hp.BlocksFormatError):
        hp.BlocksDecoder().feed(b"NOTBLOCK" + raw[8:])
    with pytest.raises(hp.BlocksFormatError):
        hp.BlocksDecoder().feed(raw + b"x")
    # A block outside the announced range.
    with pytest.raises(hp.BlocksFormatError):
        hp.BlocksDecoder().feed(_stream([(9, b"a")], first=0, count=8))


# --------------------------------------------------------------------- properties (hypothesis)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_parser_only_ever_returns_or_raises_protocol_error(pieces):
    p = hp.RequestParser(Limits(max_request_line=256, max_header_bytes=512, max_headers=8))
    try:
        for piece in pieces:
            req = p.feed(piece)
            if req is not None:
                assert req.method and req.target.startswith("/")
                req.keep_alive  # noqa: B018 - must not raise either
    except hp.ProtocolError as exc:
        assert 400 <= exc.status < 600


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=40),
        st.builds(
            "bytes={}-{}".format,
            st.one_of(st.just(""), st.integers(0, 3000).map(str)),
            st.one_of(st.just(""), st.integers(0, 3000).map(str)),
        ),
    ),
    st.integers(0, 2000),
)
def test_parse_range_is_total(value, size):
    try:
        got = hp.parse_range(value, size)
    except hp.RequestError as exc:
        assert exc.status in (400, 416)
        return
    start, end = got
    assert 0 <= start < end <= size


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_blocks_decoder_rejects_garbage_cleanly(data, cut):
    dec = hp.BlocksDecoder()
    try:
        for i in range(0, len(data), cut):
            dec.feed(data[i : i + cut])
        dec.finish()
    except hp.BlocksFormatError:
        return
    raise AssertionError("garbage accepted as a complete blocks stream")
