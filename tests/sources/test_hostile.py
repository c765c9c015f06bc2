"""Sources facing broken servers: every failure is a SourceError naming what broke, never wrong
data and never a hang."""

import http.server
import struct
import threading

import pytest

from orchestrator.sources.base import BLOCK_SIZE, SourceError
from orchestrator.sources.xapi_export import XapiExportSource

MiB = 1 << 20


class Canned(http.server.BaseHTTPRequestHandler):
    body = b""
    status = 200

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except OSError:
            pass


@pytest.fixture
def serve():
    servers = []

    def start(body, status=200, length=None):
        handler = type("H", (Canned,), {"body": body, "status": status})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def vhd_stream(size=4 * MiB, blocks=(0, 1), bitmap=b"\xff" * 512, data=b"\x5a"):
    from hostsim.datapath import vhd_stream_layout

    prefix, footer, _total, bm_size = vhd_stream_layout(size, list(blocks))
    body = prefix
    for _b in blocks:
        body += bitmap[:bm_size] + data * BLOCK_SIZE
    return body + footer


def read(url):
    src = XapiExportSource(url, "OpaqueRef:s", "00000000-0000-0000-0000-000000000001")
    with src:
        plan = src.open()
        return plan, dict(src.read_blocks())


def test_well_formed_stream(serve):
    plan, got = read(serve(vhd_stream()))
    assert plan.blocks == [0, 1] and got[1] == b"\x5a" * BLOCK_SIZE


def test_truncated_stream_is_a_clear_error(serve):
    body = vhd_stream()
    url = serve(body[: len(body) - BLOCK_SIZE // 2])
    with pytest.raises(SourceError, match="stream ended at byte"):
        read(url)


def test_not_a_vhd(serve):
    with pytest.raises(SourceError, match="not a dynamic VHD"):
        read(serve(b"<html>oops</html>" + bytes(2048)))


def test_bad_header_cookie(serve):
    body = bytearray(vhd_stream())
    body[512:520] = b"garbage!"
    with pytest.raises(SourceError, match="bad dynamic header"):
        read(serve(bytes(body)))


def test_http_error_names_the_status(serve):
    with pytest.raises(SourceError, match="HTTP 500"):
        read(serve(b"VDI_IN_USE", status=500))


def test_partial_bitmap_reads_zeros_for_clear_sectors(serve):
    bitmap = b"\x0f" + b"\xff" * 511  # sectors 0-3 not in this VHD: zeros in a full export
    plan, got = read(serve(vhd_stream(blocks=(1,), bitmap=bitmap)))
    assert got[1][:2048] == bytes(2048) and got[1][2048:4096] == b"\x5a" * 2048


def test_block_behind_the_stream_position_is_refused(serve):
    body = bytearray(vhd_stream())
    # Point block 1 back at the BAT: a stream cannot go backwards.
    table = 512 + 1024
    struct.pack_into(">I", body, table + 4, 1)
    with pytest.raises(SourceError, match="goes backwards"):
        read(serve(bytes(body)))
