"""Bounded memory for answers that grow with a disk's fragmentation (issue 13, "Bounded and fair").

A VHD whose blocks all have alternating sector bitmaps (sector 0 present, 1 absent, ...) has one
extent per 512 bytes. The real daemon runs in a subprocess; its peak RSS (VmHWM in
/proc/<pid>/status) is read before and after the request. Before the fix the extents answer was one
list in memory (2 GiB disk: 24 MB -> 2.14 GB); now it is streamed from bounded windows.
"""

import http.client
import json
import uuid

import pytest

from tests.fixtures.fragmented import SECTOR, fragmented_vhd, reset_hwm, vm_hwm_kib

MiB = 1 << 20


@pytest.fixture
def fragmented(file_sr, agent_proc):
    vdi = str(uuid.uuid4())
    size = 256 * MiB  # 524,288 extents, ~36 MB of JSON
    fragmented_vhd(file_sr.path(vdi), size)
    agent = agent_proc([file_sr.root])
    resp = agent.admin(op="create_ticket", vdi=vdi)
    return agent, resp, size


def expected_sector_runs(start, length):
    """The runs of the fragmented disk over [start, start + length) (start sector aligned)."""
    pos = start
    end = start + length
    while pos < end:
        n = min(SECTOR, end - pos)
        absent = (pos // SECTOR) % 2 == 1
        yield {"start": pos, "length": n, "zero": absent, "hole": absent}
        pos += n


def get(conn, path):
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.getheader("Transfer-Encoding"), r.read()


def test_extents_of_a_fragmented_disk_stream_in_bounded_memory(fragmented):
    agent, resp, size = fragmented
    conn = http.client.HTTPConnection(resp["http"]["host"], resp["http"]["port"], timeout=120)
    path = "/v1/exports/%s/extents" % resp["export_name"]
    try:
        status, _, _ = get(
            conn, path + "?start=0&length=%d" % (4 * MiB)
        )  # warm up: imports, caches
        assert status == 200
        reset_hwm(agent.pid)
        before = vm_hwm_kib(agent.pid)
        status, te, body = get(conn, path)
        after = vm_hwm_kib(agent.pid)
        assert status == 200 and te == "chunked"
        json_bytes = len(body)
        runs = json.loads(body)
        assert len(runs) == size // SECTOR
        # compare without building a second list of 500 K dicts
        for got, want in zip(runs, expected_sector_runs(0, size)):
            assert got == want
        del runs, body
        # the same connection still serves (chunked answers keep the connection alive)
        status, _, body = get(conn, path + "?granularity=block")
        assert status == 200
        assert json.loads(body) == [{"start": 0, "length": size, "zero": False, "hole": False}]
        # a range inside a block, not sector aligned at its end
        status, _, body = get(conn, path + "?start=%d&length=%d" % (2 * MiB + 1024, 1300))
        assert json.loads(body) == list(expected_sector_runs(2 * MiB + 1024, 1300))
    finally:
        conn.close()
    grew_mib = (after - before) / 1024.0
    print(
        "extents of %d MiB, %d runs, %d bytes of JSON: agent VmHWM %d KiB -> %d KiB (+%.1f MiB)"
        % (size // MiB, size // SECTOR, json_bytes, before, after, grew_mib)
    )
    # The old list-building answer grew by ~270 MiB here (2.1 GB for 2 GiB); one window is a few.
    assert grew_mib < 32, "agent peak RSS grew by %.1f MiB for one extents answer" % grew_mib


def test_extents_over_http_1_0_is_close_delimited(fragmented):
    agent, resp, size = fragmented
    import socket

    s = socket.create_connection((resp["http"]["host"], resp["http"]["port"]), timeout=60)
    try:
        s.sendall(
            b"GET /v1/exports/%s/extents?start=0&length=8192 HTTP/1.0\r\n\r\n"
            % resp["export_name"].encode()
        )
        data = b""
        while True:
            got = s.recv(65536)
            if not got:
                break
            data += got
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"chunked" not in head.lower() and b"content-length" not in head.lower()
    assert json.loads(body) == list(expected_sector_runs(0, 8192))
