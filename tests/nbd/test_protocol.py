"""Byte-level tests of the sans-IO NBD server state machine (agent.nbd.protocol) and of its reply
builders (agent.nbd.wire).

Constants and rules come from NetworkBlockDevice/nbd doc/proto.md; the expected bytes below are
built by hand with struct, not with the module's own builders, so an encoding slip shows.
"""

import struct

import pytest

from agent.nbd import protocol as p
from agent.nbd import wire as w

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = struct.pack(">Q", 0x3E889045565A9)


def opt(option, data=b""):
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def go_data(name, infos=()):
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name, queries):
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def request(cmd, offset=0, length=0, flags=0, handle=7):
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length)


def parse_option_replies(data):
    """-> [(option, reply_type, payload)]"""
    out = []
    pos = 0
    while pos < len(data):
        assert data[pos : pos + 8] == REPLY_MAGIC
        option, rtype, length = struct.unpack_from(">III", data, pos + 8)
        out.append((option, rtype, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def events(conn, data=b""):
    conn.feed(data)
    return list(iter(conn.next_event, None))


def negotiated(flags=w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES, tls_mode="off"):
    conn = p.ServerConnection(tls_mode=tls_mode)
    conn.greeting()
    assert events(conn, struct.pack(">I", flags)) == []
    return conn


def go(conn, name="export", size=1 << 20, structured=True, contexts=()):
    if structured:
        (ev,) = events(conn, opt(w.OPT_STRUCTURED_REPLY))
        assert parse_option_replies(ev.data) == [(8, 1, b"")]
    if contexts:
        (ev,) = events(conn, opt(w.OPT_SET_META_CONTEXT, meta_data(name, list(contexts))))
    (ev,) = events(conn, opt(w.OPT_GO, go_data(name, [w.INFO_BLOCK_SIZE])))
    assert isinstance(ev, p.ExportRequest) and ev.name == name
    replies = parse_option_replies(conn.accept_export(size))
    assert replies[-1] == (7, 1, b"")
    assert conn.in_transmission
    return conn


# --- handshake --------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    g = p.ServerConnection().greeting()
    assert g == NBDMAGIC + IHAVEOPT + struct.pack(">H", 0b11)


@pytest.mark.parametrize("flags", [0, 1 << 2, 1 << 31, w.FLAG_C_NO_ZEROES])
def test_bad_client_flags_end_the_connection(flags):
    conn = p.ServerConnection()
    with pytest.raises(p.ProtocolError):
        events(conn, struct.pack(">I", flags))


def test_truncated_client_flags_wait_for_more():
    conn = p.ServerConnection()
    assert events(conn, b"\0\0") == []
    assert events(conn, b"\0\1") == []
    assert conn.state == "options"


def test_bad_option_magic():
    conn = negotiated()
    with pytest.raises(p.ProtocolError, match="magic"):
        events(conn, b"GARBAGE!" + b"\0" * 8)


def test_oversized_option_length_closes_without_waiting_for_data():
    conn = negotiated()
    with pytest.raises(p.ProtocolError, match="exceeds"):
        events(conn, IHAVEOPT + struct.pack(">II", w.OPT_GO, w.MAX_OPTION_DATA + 1))


def test_option_split_across_feeds():
    conn = negotiated()
    data = opt(w.OPT_STRUCTURED_REPLY)
    for b in data[:-1]:
        assert events(conn, bytes([b])) == []
    (ev,) = events(conn, data[-1:])
    assert parse_option_replies(ev.data) == [(w.OPT_STRUCTURED_REPLY, w.REP_ACK, b"")]


@pytest.mark.parametrize("option", [w.OPT_PEEK_EXPORT, w.OPT_EXTENDED_HEADERS, 12, 0xFFFFFFFF])
def test_unknown_options_are_unsupported_and_skipped(option):
    conn = negotiated()
    evs = events(conn, opt(option, b"x" * 100) + opt(w.OPT_STRUCTURED_REPLY))
    assert len(evs) == 2
    ((o, rtype, _msg),) = parse_option_replies(evs[0].data)
    assert (o, rtype) == (option, 0x80000001)
    assert parse_option_replies(evs[1].data) == [(8, 1, b"")]


def test_too_many_options_is_denial_of_service():
    conn = negotiated()
    with pytest.raises(p.ProtocolError, match="denial"):
        events(conn, opt(99) * (w.MAX_OPTIONS + 1))


def test_abort_acks():
    conn = negotiated()
    (ev,) = events(conn, opt(w.OPT_ABORT))
    assert isinstance(ev, p.AbortRequest)
    assert parse_option_replies(ev.data) == [(2, 1, b"")]


def test_list():
    conn = negotiated()
    (ev,) = events(conn, opt(w.OPT_LIST))
    assert isinstance(ev, p.ListRequest)
    replies = parse_option_replies(conn.list_reply(["a", "bc"]))
    assert replies == [
        (3, 2, struct.pack(">I", 1) + b"a"),
        (3, 2, struct.pack(">I", 2) + b"bc"),
        (3, 1, b""),
    ]
    (ev,) = events(conn, opt(w.OPT_LIST, b"junk"))
    assert parse_option_replies(ev.data)[0][1] == w.REP_ERR_INVALID


def test_structured_reply_twice_is_invalid():
    conn = negotiated()
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    (ev,) = events(conn, opt(w.OPT_STRUCTURED_REPLY))
    assert parse_option_replies(ev.data)[0][1] == w.REP_ERR_INVALID
    (ev,) = events(conn, opt(w.OPT_STRUCTURED_REPLY, b"x"))
    assert parse_option_replies(ev.data)[0][1] == w.REP_ERR_INVALID


# --- INFO / GO / EXPORT_NAME --------------------------------------------------------------------


def test_go_replies_info_export_block_size_then_ack_and_enters_transmission():
    conn = negotiated()
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    (ev,) = events(conn, opt(w.OPT_GO, go_data("tkt", [w.INFO_BLOCK_SIZE, w.INFO_NAME])))
    assert ev == p.ExportRequest(w.OPT_GO, "tkt", [3, 1])
    replies = parse_option_replies(conn.accept_export(5 << 20))
    flags = 0x1 | 0x2 | 0x100 | 0x80  # HAS_FLAGS READ_ONLY CAN_MULTI_CONN SEND_DF
    assert replies[0] == (7, 3, struct.pack(">HQH", 0, 5 << 20, flags))
    assert replies[1] == (7, 3, struct.pack(">HIII", 3, 1, 2 << 20, 32 << 20))
    assert replies[2] == (7, 3, struct.pack(">H", 1) + b"tkt")
    assert replies[3] == (7, 1, b"")
    assert conn.in_transmission and conn.export_size == 5 << 20


def test_go_without_structured_replies_has_no_send_df():
    conn = negotiated()
    events(conn, opt(w.OPT_GO, go_data("x")))
    replies = parse_option_replies(conn.accept_export(4096))
    assert replies[0] == (7, 3, struct.pack(">HQH", 0, 4096, 0x103))


def test_info_stays_in_negotiation():
    conn = negotiated()
    (ev,) = events(conn, opt(w.OPT_INFO, go_data("x")))
    assert ev.option == w.OPT_INFO
    conn.accept_export(4096)
    assert not conn.in_transmission
    (ev,) = events(conn, opt(w.OPT_STRUCTURED_REPLY))
    assert isinstance(ev, p.SendReply)


def test_go_unknown_export_is_an_error_reply_not_a_close():
    conn = negotiated()
    events(conn, opt(w.OPT_GO, go_data("nope")))
    data = conn.reject_export(w.REP_ERR_UNKNOWN, "no such ticket")
    assert parse_option_replies(data) == [(7, 0x80000006, b"no such ticket")]
    assert not conn.in_transmission
    (ev,) = events(conn, opt(w.OPT_ABORT))
    assert isinstance(ev, p.AbortRequest)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0",
        struct.pack(">I", 100) + b"ab" + struct.pack(">H", 0),  # name longer than data
        go_data("x", [1])[:-1],  # info count mismatch
        go_data("x") + b"\0",  # trailing byte
        struct.pack(">I", 2) + b"a\0" + struct.pack(">H", 0),  # NUL in name
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
    ],
)
def test_malformed_go_is_invalid(data):
    conn = negotiated()
    (ev,) = events(conn, opt(w.OPT_GO, data))
    assert parse_option_replies(ev.data)[0][:2] == (7, w.REP_ERR_INVALID)
    assert conn.state == "options"


def test_export_name_with_and_without_zeroes():
    conn = negotiated()
    (ev,) = events(conn, opt(w.OPT_EXPORT_NAME, b"abc"))
    assert ev == p.ExportRequest(w.OPT_EXPORT_NAME, "abc")
    assert conn.accept_export(1024) == struct.pack(">QH", 1024, 0x103)
    conn = negotiated(flags=w.FLAG_C_FIXED_NEWSTYLE)
    events(conn, opt(w.OPT_EXPORT_NAME, b"abc"))
    assert conn.accept_export(1024) == struct.pack(">QH", 1024, 0x103) + b"\0" * 124


def test_export_name_refused_closes():
    conn = negotiated()
    events(conn, opt(w.OPT_EXPORT_NAME, b"abc"))
    with pytest.raises(p.ProtocolError):
        conn.reject_export(w.REP_ERR_UNKNOWN, "no")
    assert conn.closed


def test_events_pause_until_the_export_request_is_answered():
    conn = negotiated()
    conn.feed(opt(w.OPT_GO, go_data("x")) + opt(w.OPT_ABORT))
    assert isinstance(conn.next_event(), p.ExportRequest)
    assert conn.next_event() is None
    conn.reject_export()
    assert isinstance(conn.next_event(), p.AbortRequest)


# --- TLS modes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option", [w.OPT_LIST, w.OPT_GO, w.OPT_INFO, w.OPT_STRUCTURED_REPLY, w.OPT_SET_META_CONTEXT, 77]
)
def test_tls_required_refuses_everything_but_starttls_and_abort(option):
    conn = negotiated(tls_mode="require")
    (ev,) = events(conn, opt(option, go_data("x")))
    assert parse_option_replies(ev.data)[0][:2] == (option, w.REP_ERR_TLS_REQD)


def test_tls_required_export_name_closes():
    conn = negotiated(tls_mode="require")
    with pytest.raises(p.ProtocolError):
        events(conn, opt(w.OPT_EXPORT_NAME, b"x"))


def test_starttls_resets_negotiation_state():
    conn = negotiated(tls_mode="optional")
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    (ev,) = events(conn, opt(w.OPT_STARTTLS))
    assert isinstance(ev, p.StartTLS)
    assert parse_option_replies(ev.data) == [(5, 1, b"")]
    assert events(conn, b"") == []  # waiting for the TLS handshake
    conn.tls_established()
    assert conn.tls_active and not conn.structured
    (ev,) = events(conn, opt(w.OPT_STARTTLS))
    assert parse_option_replies(ev.data)[0][1] == w.REP_ERR_INVALID
    # After TLS, 'require' mode lets options through
    conn2 = negotiated(tls_mode="require")
    events(conn2, opt(w.OPT_STARTTLS))
    conn2.tls_established()
    (ev,) = events(conn2, opt(w.OPT_STRUCTURED_REPLY))
    assert parse_option_replies(ev.data) == [(8, 1, b"")]


def test_bytes_pipelined_after_starttls_are_a_violation():
    conn = negotiated(tls_mode="require")
    with pytest.raises(p.ProtocolError):
        events(conn, opt(w.OPT_STARTTLS) + b"\x16\x03\x01")


def test_starttls_when_tls_off_is_policy():
    conn = negotiated()
    (ev,) = events(conn, opt(w.OPT_STARTTLS))
    assert parse_option_replies(ev.data)[0][1] == w.REP_ERR_POLICY
    conn = negotiated(tls_mode="optional")
    (ev,) = events(conn, opt(w.OPT_STARTTLS, b"x"))
    assert parse_option_replies(ev.data)[0][1] == w.REP_ERR_INVALID


# --- metadata contexts ----------------------------------------------------------------------------


def meta_replies(ev):
    return [(o, t, d) for (o, t, d) in parse_option_replies(ev.data)]


def test_meta_context_needs_structured_replies():
    conn = negotiated()
    (ev,) = events(conn, opt(w.OPT_SET_META_CONTEXT, meta_data("x", ["base:allocation"])))
    assert meta_replies(ev)[0][1] == w.REP_ERR_INVALID


def test_list_meta_context_all_and_wildcards():
    conn = negotiated()
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    (ev,) = events(conn, opt(w.OPT_LIST_META_CONTEXT, meta_data("x", [])))
    assert meta_replies(ev) == [
        (9, 4, b"\0\0\0\0base:allocation"),
        (9, 4, b"\0\0\0\0fastpath:changed"),
        (9, 1, b""),
    ]
    (ev,) = events(conn, opt(w.OPT_LIST_META_CONTEXT, meta_data("x", ["fastpath:", "qemu:x"])))
    assert meta_replies(ev) == [(9, 4, b"\0\0\0\0fastpath:changed"), (9, 1, b"")]


def test_set_meta_context_selects_exact_names_and_ignores_unknown():
    conn = negotiated()
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    q = ["base:", "base:allocation", "fastpath:changed", "qemu:dirty-bitmap:x", "base:nope"]
    (ev,) = events(conn, opt(w.OPT_SET_META_CONTEXT, meta_data("x", q)))
    assert meta_replies(ev) == [
        (10, 4, struct.pack(">I", 1) + b"base:allocation"),
        (10, 4, struct.pack(">I", 2) + b"fastpath:changed"),
        (10, 1, b""),
    ]
    assert conn.meta_contexts == {1: "base:allocation", 2: "fastpath:changed"}


@pytest.mark.parametrize(
    "data",
    [
        b"\0\0",
        struct.pack(">I", 9) + b"x",
        meta_data("x", ["noncolon"]),
        meta_data("x", ["base:allocation"])[:-1],
        meta_data("x", []) + b"\0",
    ],
)
def test_malformed_meta_context_is_invalid_and_clears_selection(data):
    conn = negotiated()
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    events(conn, opt(w.OPT_SET_META_CONTEXT, meta_data("x", ["base:allocation"])))
    assert conn.meta_contexts
    (ev,) = events(conn, opt(w.OPT_SET_META_CONTEXT, data))
    assert meta_replies(ev)[0][1] == w.REP_ERR_INVALID
    assert conn.meta_contexts == {}


def test_too_many_meta_queries():
    conn = negotiated()
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    (ev,) = events(conn, opt(w.OPT_LIST_META_CONTEXT, meta_data("x", ["base:"] * 17)))
    assert meta_replies(ev)[0][1] == w.REP_ERR_TOO_BIG


def test_meta_contexts_dropped_when_go_names_another_export():
    conn = negotiated()
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    events(conn, opt(w.OPT_SET_META_CONTEXT, meta_data("a", ["base:allocation"])))
    events(conn, opt(w.OPT_GO, go_data("b")))
    conn.accept_export(4096)
    assert conn.meta_contexts == {}
    (ev,) = events(conn, request(w.CMD_BLOCK_STATUS, 0, 512))
    assert isinstance(ev, p.InvalidRequest) and ev.error.code == w.EINVAL


# --- transmission ---------------------------------------------------------------------------------


def test_read_request_event():
    conn = go(negotiated())
    (ev,) = events(conn, request(w.CMD_READ, 4096, 512, handle=0xDEADBEEFCAFE))
    assert ev == p.Request(0xDEADBEEFCAFE, w.CMD_READ, 0, 4096, 512)


def test_read_with_df_flag_is_valid_only_with_structured_replies():
    conn = go(negotiated())
    (ev,) = events(conn, request(w.CMD_READ, 0, 512, flags=w.CMD_FLAG_DF))
    assert isinstance(ev, p.Request)
    conn = go(negotiated(), structured=False)
    (ev,) = events(conn, request(w.CMD_READ, 0, 512, flags=w.CMD_FLAG_DF))
    assert isinstance(ev, p.InvalidRequest) and ev.error.code == w.EINVAL


@pytest.mark.parametrize(
    "req, code",
    [
        (request(w.CMD_READ, (1 << 20) - 511, 512), w.EINVAL),  # past the end
        (request(w.CMD_READ, 1 << 63, 1), w.EINVAL),  # far past the end
        (request(w.CMD_READ, 0, 512, flags=w.CMD_FLAG_FUA), w.EINVAL),  # FUA not advertised
        (request(w.CMD_READ, 0, 512, flags=1 << 15), w.EINVAL),
        (request(w.CMD_BLOCK_STATUS, 0, 512, flags=w.CMD_FLAG_DF), w.EINVAL),
        (request(w.CMD_TRIM, 0, 512), w.EPERM),
        (request(w.CMD_WRITE_ZEROES, 0, 512), w.EPERM),
        (request(w.CMD_RESIZE, 0, 0), w.EPERM),
        (request(99, 0, 0), w.EINVAL),
        (request(w.CMD_FLUSH, 1, 0), w.EINVAL),
        (request(w.CMD_BLOCK_STATUS, 0, 512), w.EINVAL),  # no meta context selected
    ],
)
def test_invalid_requests_fail_alone(req, code):
    conn = go(negotiated())
    evs = events(conn, req + request(w.CMD_READ, 0, 512, handle=8))
    assert isinstance(evs[0], p.InvalidRequest)
    assert evs[0].error.code == code and evs[0].request.handle == 7
    assert evs[1] == p.Request(8, w.CMD_READ, 0, 0, 512)


def test_oversized_read_is_einval():
    conn = go(negotiated(), size=1 << 30)
    (ev,) = events(conn, request(w.CMD_READ, 0, w.MAX_REQUEST_LENGTH + 1))
    assert ev.error.code == w.EINVAL
    (ev,) = events(conn, request(w.CMD_READ, 0, w.MAX_REQUEST_LENGTH))
    assert isinstance(ev, p.Request)


def test_write_is_eperm_and_its_payload_is_skipped():
    conn = go(negotiated())
    evs = events(conn, request(w.CMD_WRITE, 0, 10) + b"0123")
    assert len(evs) == 1 and evs[0].error.code == w.EPERM
    evs = events(conn, b"456789" + request(w.CMD_READ, 0, 512, handle=9))
    assert evs == [p.Request(9, w.CMD_READ, 0, 0, 512)]


def test_huge_write_payload_is_a_violation():
    conn = go(negotiated())
    with pytest.raises(p.ProtocolError):
        events(conn, request(w.CMD_WRITE, 0, w.MAX_REQUEST_LENGTH + 1))


def test_bad_request_magic():
    conn = go(negotiated())
    with pytest.raises(p.ProtocolError):
        events(conn, b"\xff" * 28)


def test_disconnect_ignores_anything_after():
    conn = go(negotiated())
    evs = events(conn, request(w.CMD_DISC) + b"garbage" * 10)
    assert evs == [p.Disconnect()]
    assert conn.closed
    assert events(conn, b"more") == []


def test_block_status_with_context_is_valid():
    conn = go(negotiated(), contexts=["base:allocation"], name="e")
    (ev,) = events(conn, request(w.CMD_BLOCK_STATUS, 0, 4096, flags=w.CMD_FLAG_REQ_ONE))
    assert isinstance(ev, p.Request)
    (ev,) = events(conn, request(w.CMD_BLOCK_STATUS, 0, 0))
    assert ev.error.code == w.EINVAL


def test_many_tiny_requests_in_one_feed():
    conn = go(negotiated())
    evs = events(conn, b"".join(request(w.CMD_READ, i, 1, handle=i) for i in range(10000)))
    assert len(evs) == 10000 and evs[-1].handle == 9999


# --- reply builders -------------------------------------------------------------------------------


def test_reply_builders_bytes():
    assert w.simple_reply(5, 22) == struct.pack(">IIQ", 0x67446698, 22, 5)
    assert w.offset_data_header(5, 4096, 100, done=True) == struct.pack(
        ">IHHQIQ", 0x668E33EF, 1, 1, 5, 108, 4096
    )
    assert w.offset_hole(5, 0, 512) == struct.pack(">IHHQIQI", 0x668E33EF, 0, 2, 5, 12, 0, 512)
    assert w.none_chunk(5) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 5, 0)
    assert (
        w.error_chunk(5, 22, "bad")
        == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 5, 9, 22, 3) + b"bad"
    )
    assert w.block_status_chunk(5, 2, [(512, 1), (1024, 0)], done=True) == struct.pack(
        ">IHHQIIIIII", 0x668E33EF, 1, 5, 5, 20, 2, 512, 1, 1024, 0
    )
    with pytest.raises(ValueError):
        w.offset_hole(5, 0, 0)
    with pytest.raises(ValueError):
        w.block_status_chunk(5, 1, [])
    with pytest.raises(ValueError):
        w.offset_data_header(5, 0, 0)


def test_error_reply_simple_vs_structured():
    conn = go(negotiated(), structured=False)
    assert conn.error_reply(3, w.EINVAL, "x") == struct.pack(">IIQ", 0x67446698, 22, 3)
    conn = go(negotiated())
    assert conn.error_reply(3, w.EINVAL, "x")[:8] == struct.pack(">IHH", 0x668E33EF, 1, 0x8001)
