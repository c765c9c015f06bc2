"""Fuzzing the sans-IO state machine: whatever bytes arrive, in whatever pieces, it only ever returns
events or raises ProtocolError (never struct.error, IndexError, UnicodeError, ...), and the replies it
builds are well-formed option replies."""

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.nbd import protocol as p
from agent.nbd import wire as w

OPTIONS = [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 99]


def drive(conn, chunks, accept=True):
    """Feed chunks, answer export requests, return the events; ProtocolError propagates."""
    out = []
    for chunk in chunks:
        conn.feed(chunk)
        while True:
            ev = conn.next_event()
            if ev is None:
                break
            out.append(ev)
            if isinstance(ev, p.ExportRequest):
                if accept:
                    conn.accept_export(1 << 20, "fuzz")
                else:
                    conn.reject_export(w.REP_ERR_UNKNOWN, "no")
            elif isinstance(ev, p.StartTLS):
                conn.tls_established()
            elif isinstance(ev, (p.AbortRequest, p.Disconnect)):
                return out
            if isinstance(ev, p.SendReply):
                check_option_replies(ev.data)
    return out


def check_option_replies(data):
    pos = 0
    while pos < len(data):
        magic, _opt, _rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == w.OPTION_REPLY_MAGIC
        pos += 20 + length
    assert pos == len(data)


def split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    prev = 0
    for c in points + [len(data)]:
        pieces.append(data[prev:c])
        prev = c
    return pieces


option = st.tuples(st.sampled_from(OPTIONS), st.binary(max_size=64)).map(
    lambda od: b"IHAVEOPT" + struct.pack(">II", od[0], len(od[1])) + od[1]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tls=st.sampled_from(w.TLS_MODES),
    opts=st.lists(option, max_size=8),
    tail=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=4096), max_size=6),
    accept=st.booleans(),
)
def test_random_options_only_events_or_protocol_errors(tls, opts, tail, cuts, accept):
    conn = p.ServerConnection(tls_mode=tls)
    data = struct.pack(">I", 3) + b"".join(opts) + tail
    try:
        drive(conn, split(data, cuts), accept)
    except p.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=5)
)
def test_random_bytes_from_the_start(raw, cuts):
    conn = p.ServerConnection()
    try:
        drive(conn, split(raw, cuts))
    except p.ProtocolError:
        pass


request = st.tuples(
    st.integers(min_value=0, max_value=0xFFFF),
    st.integers(min_value=0, max_value=12),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    st.integers(min_value=0, max_value=(1 << 32) - 1),
).map(lambda r: struct.pack(">IHHQQI", w.REQUEST_MAGIC, r[0], r[1], 1, r[2], r[3]))


@settings(max_examples=300, deadline=None)
@given(
    reqs=st.lists(request, max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=5),
)
def test_random_requests_are_valid_or_invalid_never_crash(reqs, cuts):
    conn = p.ServerConnection()
    neg = struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 8, 0)
    name = b"x"
    neg += (
        b"IHAVEOPT" + struct.pack(">II", 7, 6 + len(name)) + struct.pack(">I", 1) + name + b"\0\0"
    )
    try:
        events = drive(conn, [neg] + split(b"".join(reqs), cuts))
    except p.ProtocolError:
        return
    for ev in events:
        if isinstance(ev, p.Request):
            # Anything let through is in range and within the limits.
            if ev.type in (w.CMD_READ, w.CMD_CACHE, w.CMD_BLOCK_STATUS):
                assert ev.offset + ev.length <= 1 << 20
            if ev.type == w.CMD_READ:
                assert ev.length <= w.MAX_REQUEST_LENGTH
        elif isinstance(ev, p.InvalidRequest):
            assert ev.error.code in (w.EINVAL, w.EPERM)
