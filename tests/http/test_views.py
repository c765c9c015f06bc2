"""The HTTP layer against small in-memory exports: cases a real chain cannot easily produce.

- a changed block that is no longer allocated goes out as a ZERO frame;
- an export whose chain changes under a running stream (ExportView.check raising) ends the stream
  early and cleanly: the client sees a short body without an end frame, never mixed data;
- failures to open an export map to JSON errors by kind.
"""

import json

import pytest

from agent.http import protocol as hp
from agent.http.exportview import ExportView
from agent.http.limits import Limits
from agent.http.server import HttpServer
from agent.tickets import TicketStore
from tests.http.conftest import request, wait_for

BS = 64 * 1024


class MemoryView(ExportView):
    def __init__(self, data, allocated, changed=None, fail_check_after=None):
        self.data = data
        self.size = len(data)
        self.block_size = BS
        self.vdi = "mem"
        self.base_vdi = "base" if changed is not None else None
        self.chain_uuids = ("leaf",)
        self.base_uuids = ("base",) if changed is not None else ()
        self._allocated = sorted(allocated)
        self._changed = sorted(changed or [])
        self.fail_check_after = fail_check_after
        self.checks = 0

    def allocated_blocks(self):
        return self._allocated

    def changed_blocks(self):
        return self._changed

    def extents(self, offset, length):
        return [(offset, length, False, False)]

    def block_pieces(self, index):
        if index not in self._allocated:
            return [("zero", self.block_length(index))]
        start = index * self.block_size
        return [("bytes", self.data[start : start + self.block_length(index)])]

    def read_pieces(self, offset, length):
        return [("bytes", self.data[offset : offset + length])]

    def check(self):
        self.checks += 1
        if self.fail_check_after is not None and self.checks > self.fail_check_after:
            raise hp.HttpError(
                "the chain changed under the export", status=409, code="chain_changed"
            )


class Env(object):
    def __init__(self, server, tickets):
        self.server = server
        self.tickets = tickets
        self.host, self.port = server.address

    def connect(self, timeout=10):
        import socket

        return socket.create_connection((self.host, self.port), timeout=timeout)


@pytest.fixture
def serve():
    servers = []

    def make(opener):
        tickets = TicketStore()
        server = HttpServer(("127.0.0.1", 0), tickets, opener, limits=Limits(header_timeout=2))
        server.start()
        servers.append(server)
        return Env(server, tickets)

    yield make
    for s in servers:
        s.stop()


DATA = bytes(range(256)) * (4 * BS // 256) + b"\x07" * 1000  # 4 blocks and a short fifth


def test_changed_but_unallocated_block_is_a_zero_frame(serve):
    view = MemoryView(DATA, allocated=[0, 2, 4], changed=[1, 2, 4])
    env = serve(lambda ticket: view)
    t = env.tickets.create("mem", base="base").id
    status, headers, body = request(env, "/v1/exports/%s/blocks" % t)
    assert status == 200 and len(body) == int(headers["content-length"])
    dec = hp.BlocksDecoder()
    events = dec.feed(body)
    dec.finish()
    frames = [(e[1], e[2], len(e[3])) for e in events if e[0] == "block"]
    assert frames == [(1, hp.FRAME_ZERO, 0), (2, 0, BS), (4, 0, 1000)]
    assert env.server.metrics.blocks["zero"] == 1


def test_chain_changing_mid_stream_ends_it_without_mixed_data(serve):
    # checks: before the head, before blocks 0 and 1, then before block 2 (fails)
    view = MemoryView(DATA, allocated=[0, 1, 2, 3, 4], fail_check_after=3)
    env = serve(lambda ticket: view)
    t = env.tickets.create("mem").id
    s = env.connect()
    try:
        s.sendall(("GET /v1/exports/%s/blocks HTTP/1.1\r\nHost: x\r\n\r\n" % t).encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    dec = hp.BlocksDecoder()
    events = dec.feed(body)
    with pytest.raises(hp.BlocksFormatError):
        dec.finish()  # no end frame: the client knows the stream is incomplete
    blocks = [e for e in events if e[0] == "block"]
    assert [b[1] for b in blocks] == [0, 1]
    for _, i, _, data in blocks:
        assert data == DATA[i * BS : (i + 1) * BS]
    assert env.server.metrics.errors["stream"] == 1


class VDINotFound(LookupError):
    pass


class UnsupportedFormat(Exception):
    pass


class ChainChanged(Exception):
    pass


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (VDINotFound("vdi x not in SR"), 404, "vdi_not_found"),
        (UnsupportedFormat("QCOW2 VDI: use XAPI's NBD"), 409, "unsupported_format"),
        (ChainChanged("parent uuid changed"), 409, "chain_changed"),
        (RuntimeError("boom"), 500, "export_failed"),
    ],
)
def test_open_failures_map_to_json_errors(serve, exc, status, code):
    def opener(ticket):
        raise exc

    env = serve(opener)
    t = env.tickets.create("mem").id
    got, _, body = request(env, "/v1/exports/%s" % t)
    doc = json.loads(body)
    assert (got, doc["error"]) == (status, code)
    assert "Traceback" not in doc["message"]
    # The failed open did not hold the ticket's connection slot.
    wait_for(lambda: env.tickets.get(t).connections == 0)


class BigBlockView(MemoryView):
    """2 MiB blocks, the disk's last block short and allocated: the VHD pads it."""

    def vhd_layout(self, block_indexes, delta=False):
        from agent.vhd import VhdStreamLayout

        return VhdStreamLayout(self.size, block_indexes, self.block_size)


def test_vhd_stream_pads_a_short_last_block(serve, tmp_path, qemu_tools):
    import random
    import subprocess

    mib2 = 2 << 20
    data = random.Random(5).randbytes(2 * mib2 + 4096)
    view = BigBlockView(data, allocated=[0, 2])
    view.block_size = mib2
    env = serve(lambda ticket: view)
    t = env.tickets.create("mem").id
    status, headers, body = request(env, "/v1/exports/%s/vhd" % t)
    assert status == 200 and len(body) == int(headers["content-length"])
    out = tmp_path / "short.vhd"
    out.write_bytes(body)
    model = bytearray(data)
    model[mib2 : 2 * mib2] = bytes(mib2)  # block 1 is not allocated: it reads as zeros
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    r = subprocess.run(
        ["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(out), str(raw)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_vhd_of_a_disk_not_a_multiple_of_512_is_a_typed_409(serve):
    view = BigBlockView(bytes(2 * BS + 100), allocated=[0, 1, 2])
    env = serve(lambda ticket: view)
    t = env.tickets.create("mem").id
    status, _, body = request(env, "/v1/exports/%s/vhd" % t)
    assert status == 409 and json.loads(body)["error"] == "not_vhd_streamable"
    assert "multiple of 512" in json.loads(body)["message"]
    status, _, body = request(env, "/v1/exports/%s/raw" % t)  # the other streams still serve it
    assert status == 200 and body == bytes(2 * BS + 100)


# Stand-ins for agent.export's errors (same module, same names as the real ones).
ChainChangedError = type("ChainChanged", (Exception,), {"__module__": "agent.export"})
ExportErrorStandIn = type("ExportError", (Exception,), {"__module__": "agent.export"})


class GuardedView(MemoryView):
    """check() raises like agent.export.Export.check once the chain 'changed'."""

    def __init__(self, *a, **kw):
        self.changed_after = kw.pop("changed_after")
        MemoryView.__init__(self, *a, **kw)

    def check(self):
        self.checks += 1
        if self.checks > self.changed_after:
            raise ChainChangedError(
                "the VHD chain of x changed under the export: leaf.vhd: resized"
            )


@pytest.mark.parametrize("path", ["raw", "blocks", "vhd"])
def test_a_chain_change_after_the_last_data_still_fails_the_stream(serve, path):
    """The final check comes after the data: the client never gets a complete-looking stream."""
    data = bytes(range(256)) * (2 * BS // 256)  # two blocks
    # checks: before the head, before block 0, before block 1, then the final one (fails)
    view = GuardedView(data, allocated=[0, 1], changed_after=3)
    view.vhd_layout = BigBlockView.vhd_layout.__get__(view)
    env = serve(lambda ticket: view)
    t = env.tickets.create("mem").id
    s = env.connect()
    try:
        s.sendall(("GET /v1/exports/%s/%s HTTP/1.1\r\nHost: x\r\n\r\n" % (t, path)).encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(
        [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[
            1
        ]
    )
    assert len(body) < length  # short: the client sees the failure
    wait_for(lambda: env.server.metrics.errors.get("stream", 0) == 1)


def test_export_errors_before_the_head_are_clean_json(serve):
    class Failing(MemoryView):
        def extents(self, offset, length):
            raise ExportErrorStandIn("range [0, +5) outside the export")

        def check(self):
            raise ChainChangedError("the VHD chain of x changed under the export")

    env = serve(lambda ticket: Failing(DATA, allocated=[0]))
    t = env.tickets.create("mem").id
    status, _, body = request(env, "/v1/exports/%s/extents" % t)
    assert (status, json.loads(body)["error"]) == (500, "export_failed")
    status, _, body = request(env, "/v1/exports/%s/raw" % t, [("Range", "bytes=0-0")])
    assert (status, json.loads(body)["error"]) == (409, "chain_changed")
    assert "changed under the export" in json.loads(body)["message"]
