"""Live ticket ids never reach the agent's log whole (issue 13): tickets are bearer tokens, so the
log shows at most agent.tickets.log_id()'s short prefix. Every path that names a ticket is walked
against the real daemon (created, used over NBD and HTTP, refused, revoked, used after revocation,
opened for a missing VDI) and its whole log is searched for the full ids."""

import http.client
import os
import struct
import uuid

import pytest

from agent.tickets import LOG_ID_CHARS, log_id
from tests.fixtures.vhd import Level, pattern

MiB = 1 << 20


def nbd_go(agent, name):
    """A raw fixed-newstyle NBD_OPT_GO for export `name`; returns the first reply's type."""
    s = agent.connect()
    try:
        assert s.recv(18)[:16] == b"NBDMAGICIHAVEOPT"
        s.sendall(struct.pack(">I", 3))
        data = name.encode()
        payload = struct.pack(">I", len(data)) + data + struct.pack(">H", 0)
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(payload)) + payload)
        head = b""
        while len(head) < 20:
            got = s.recv(20 - len(head))
            if not got:
                break
            head += got
        return struct.unpack(">QIII", head)[2] if len(head) == 20 else None
    finally:
        s.close()


def test_the_log_never_holds_a_whole_ticket_id(file_sr, agent_proc):
    nbd = pytest.importorskip("nbd")
    vdis, models = file_sr.chain([Level(2 * MiB, writes=[(0, pattern(3, 4096))])])
    gone = file_sr.qemu_vdi(2 * MiB)
    agent = agent_proc([file_sr.root], extra=["--log-level", "debug"])
    used = agent.admin(op="create_ticket", vdi=vdis[0])
    t = used["export_name"]
    h = nbd.NBD()
    h.connect_uri(agent.uri(t))
    assert h.pread(4096, 0) == bytes(models[0][:4096])
    h.shutdown()
    host, port = used["http"]["host"], used["http"]["port"]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/v1/exports/%s/raw" % t, headers={"Range": "bytes=0-99"})
    assert conn.getresponse().read() == bytes(models[0][:100])
    conn.request("DELETE", "/v1/exports/%s" % t)
    r = conn.getresponse()
    assert r.status == 200 and r.read()
    conn.request("GET", "/v1/exports/%s" % t)  # revoked
    assert conn.getresponse().read()
    conn.close()
    assert nbd_go(agent, t) is not None  # refused over NBD: the refusal is logged
    unknown = uuid.uuid4().hex
    assert nbd_go(agent, unknown) is not None
    missing = agent.ticket(gone)
    os.unlink(file_sr.path(gone))
    assert nbd_go(agent, missing) is not None  # the export cannot open: logged
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/v1/exports/%s/extents" % missing)
    status = conn.getresponse().status
    assert status == 404, status
    conn.close()
    agent.stop()
    text = agent.log()
    for full in (t, unknown, missing):
        assert len(full) > LOG_ID_CHARS
        assert full not in text, "a whole ticket id is in the agent's log"
        assert full[: LOG_ID_CHARS + 1] not in text
    assert log_id(t) in text  # the prefix is there: the test saw those log lines


def test_log_id_is_a_short_prefix():
    assert log_id(None) == "-"
    assert log_id("abc") == "abc"
    assert log_id("0123456789abcdef" * 2) == "01234567..."
