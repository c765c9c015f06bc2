"""HTTP streams checked by readers we did not write: qemu-img (info, compare), vhdiinfo and pyvhdi.

raw (whole and ranges) must equal the chain's guest bytes, the blocks stream must parse back to the
source, and the VHD stream saved to a file must be a valid dynamic VHD (or, with a base, a
differencing VHD whose parent is the base) with the same contents.
"""

import json
import os
import subprocess

import pytest

from agent.http import protocol as hp
from tests.http.conftest import BASE_VDI, SIZE, VDI, MiB, request, wait_for

TIMEOUT = 60


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def test_healthz_and_unknown_paths(env):
    status, headers, body = request(env, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, headers, body = request(env, "/nope")
    assert status == 404 and json.loads(body)["error"] == "not_found"
    status, headers, body = request(env, "/healthz", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_export_info(env):
    t = env.ticket(base=True)
    status, _, body = request(env, "/v1/exports/%s" % t)
    assert status == 200
    info = json.loads(body)
    assert info["size"] == SIZE
    assert info["block_size"] == 2 * MiB
    assert info["block_count"] == 5
    assert info["vdi"] == VDI
    assert info["depth"] == 2 and len(info["chain"]) == 2
    assert info["allocation"]["allocated_blocks"] == 4
    assert info["base"]["vdi"] == BASE_VDI
    assert info["base"]["changed_blocks"] == 2
    assert info["base"]["chain"] == info["chain"][1:]


def test_extents_allocation_and_changed(env, disk):
    t = env.ticket(base=True)
    status, _, body = request(env, "/v1/exports/%s/extents?context=allocation" % t)
    assert status == 200
    runs = json.loads(body)
    pos = 0
    for r in runs:
        assert r["start"] == pos and r["length"] > 0
        if r["hole"]:
            assert disk.model[pos : pos + r["length"]].count(0) == r["length"]
        pos += r["length"]
    assert pos == SIZE
    # The never-written last block is a hole.
    assert runs[-1]["hole"] and runs[-1]["start"] <= 8 * MiB
    status, _, body = request(env, "/v1/exports/%s/extents?context=changed" % t)
    changed = [(r["start"], r["length"]) for r in json.loads(body) if r["changed"]]
    assert changed == [(2 * MiB, 4 * MiB)]
    status, _, body = request(env, "/v1/exports/%s/extents?context=changed" % env.ticket())
    assert status == 400 and json.loads(body)["error"] == "no_base"
    status, _, body = request(env, "/v1/exports/%s/extents?context=bogus" % t)
    assert status == 400


def test_raw_whole_and_ranges(env, disk):
    from agent.vhd import open_chain

    chain = open_chain(disk.leaf)
    t = env.ticket()
    status, headers, body = request(env, "/v1/exports/%s/raw" % t)
    assert status == 200 and headers["accept-ranges"] == "bytes"
    assert body == disk.model == chain.read(0, SIZE)
    for first, last in [
        (0, 0),
        (2 * MiB - 10, 2 * MiB + 10),
        (SIZE - 1, SIZE - 1),
        (123, 4 * MiB + 77),
    ]:
        status, headers, body = request(
            env, "/v1/exports/%s/raw" % t, [("Range", "bytes=%d-%d" % (first, last))]
        )
        assert status == 206
        assert headers["content-range"] == "bytes %d-%d/%d" % (first, last, SIZE)
        assert body == disk.model[first : last + 1] == chain.read(first, last + 1 - first)
    status, headers, body = request(env, "/v1/exports/%s/raw" % t, [("Range", "bytes=-100")])
    assert status == 206 and body == disk.model[-100:]
    chain.close()
    status, headers, body = request(env, "/v1/exports/%s/raw" % t, method="HEAD")
    assert status == 200 and int(headers["content-length"]) == SIZE


@pytest.mark.parametrize(
    "value, status",
    [("bytes=%d-" % SIZE, 416), ("bytes=0-1,4-5", 416), ("bytes=9-3", 400), ("pages=1-2", 400)],
)
def test_raw_bad_ranges(env, value, status):
    got, headers, body = request(env, "/v1/exports/%s/raw" % env.ticket(), [("Range", value)])
    assert got == status
    err = json.loads(body)
    assert set(err) == {"error", "message"}
    if status == 416:
        assert headers["content-range"] == "bytes */%d" % SIZE


def decode_blocks(body):
    dec = hp.BlocksDecoder()
    events = dec.feed(body)
    dec.finish()
    header = events[0][1]
    blocks = {e[1]: (e[2], e[3]) for e in events if e[0] == "block"}
    return header, blocks


def test_blocks_stream_full_parses_back_to_the_source(env, disk):
    t = env.ticket()
    status, headers, body = request(env, "/v1/exports/%s/blocks" % t)
    assert status == 200
    header, blocks = decode_blocks(body)
    assert header["size"] == SIZE and not header["changed"]
    assert sorted(blocks) == [0, 1, 2, 3]
    image = bytearray(SIZE)
    for i, (flags, data) in blocks.items():
        assert flags == 0
        image[i * 2 * MiB : i * 2 * MiB + len(data)] = data
    assert bytes(image) == disk.model
    # Blocks 0 and 2 live whole in one file; 1 (split over two files) and 3 (partly written) do not.
    assert env.server.metrics.blocks["sendfile"] == 2
    assert env.server.metrics.blocks["assembled"] == 2


def test_blocks_stream_changed_and_ranges(env, disk):
    t = env.ticket(base=True)
    status, _, body = request(env, "/v1/exports/%s/blocks" % t)
    header, blocks = decode_blocks(body)
    assert header["changed"] and sorted(blocks) == [1, 2]
    for i, (_, data) in blocks.items():
        assert data == disk.model[i * 2 * MiB : (i + 1) * 2 * MiB]
    # The orchestrator splits the disk into parallel block ranges.
    got = {}
    for start, count in [(0, 2), (2, 2), (4, 1)]:
        status, _, body = request(
            env, "/v1/exports/%s/blocks?changed=0&start=%d&count=%d" % (t, start, count)
        )
        assert status == 200
        header, blocks = decode_blocks(body)
        assert (header["first"], header["count"]) == (start, count)
        got.update(blocks)
    assert sorted(got) == [0, 1, 2, 3]
    status, _, body = request(env, "/v1/exports/%s/blocks?start=4&count=2" % t)
    assert status == 416
    status, _, body = request(env, "/v1/exports/%s/blocks?changed=1" % env.ticket())
    assert status == 400 and json.loads(body)["error"] == "no_base"


def test_vhd_stream_full_passes_qemu_img(env, disk, tmp_path, qemu_tools):
    t = env.ticket()
    status, headers, body = request(env, "/v1/exports/%s/vhd" % t)
    assert status == 200 and int(headers["content-length"]) == len(body)
    out = tmp_path / "stream.vhd"
    out.write_bytes(body)
    raw = tmp_path / "model.raw"
    raw.write_bytes(disk.model)
    # qemu-img has no checker for vpc (`qemu-img check` exits 63): info, compare and vhdiinfo judge.
    r = run(["qemu-img", "info", "--output=json", "-f", "vpc", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "vpc" and info["virtual-size"] >= SIZE
    r = run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(out), str(raw)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(["vhdiinfo", str(out)])
    assert r.returncode == 0 and "Dynamic" in r.stdout, r.stdout + r.stderr


def test_vhd_stream_delta_reads_through_its_parent_with_pyvhdi(env, disk, tmp_path, pyvhdi_module):
    t = env.ticket(base=True)
    status, headers, body = request(env, "/v1/exports/%s/vhd" % t)
    assert status == 200
    delta = tmp_path / "delta.vhd"
    delta.write_bytes(body)
    # Only the changed blocks travel: two 2 MiB blocks plus metadata.
    assert len(body) < 2 * (2 * MiB + 512) + 64 * 1024
    parent = pyvhdi_module.file()
    parent.open(disk.root)
    child = pyvhdi_module.file()
    child.open(str(delta))
    try:
        child.set_parent(parent)
        assert child.get_media_size() == SIZE
        child.seek_offset(0, os.SEEK_SET)
        data = child.read_buffer(SIZE)
    finally:
        child.close()
        parent.close()
    assert data == disk.model


def test_parallel_block_range_streams_rebuild_the_disk(env, disk):
    """The orchestrator's pattern: several /blocks streams at once over disjoint ranges."""
    import threading

    t = env.ticket()
    results = {}
    errors = []

    def fetch(start, count):
        try:
            status, _, body = request(
                env, "/v1/exports/%s/blocks?start=%d&count=%d" % (t, start, count)
            )
            assert status == 200
            results.update(decode_blocks(body)[1])
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(i, 1)) for i in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    image = bytearray(SIZE)
    for i, (_, data) in results.items():
        image[i * 2 * MiB : i * 2 * MiB + len(data)] = data
    assert bytes(image) == disk.model


@pytest.mark.parametrize("path", ["raw", "vhd", "blocks", "blocks?changed=1", ""])
def test_head_announces_the_length_get_sends(env, path):
    t = env.ticket(base=True)
    sep = "/" if path else ""
    h_status, h_headers, _ = request(env, "/v1/exports/%s%s%s" % (t, sep, path), method="HEAD")
    g_status, g_headers, body = request(env, "/v1/exports/%s%s%s" % (t, sep, path))
    assert h_status == g_status == 200
    assert int(h_headers["content-length"]) == int(g_headers["content-length"]) == len(body)


def test_keep_alive_reuses_the_export_then_drops_it_when_idle(env, disk):
    calls = []
    opener = env.server.exports_opener

    def counting(ticket):
        calls.append(ticket.id)
        return opener(ticket)

    env.server.exports_opener = counting
    t = env.ticket()
    s = env.connect()
    try:
        for first in (0, 4096, 3 * MiB):
            status, _, body = request(
                env,
                "/v1/exports/%s/raw" % t,
                [("Range", "bytes=%d-%d" % (first, first + 99))],
                sock=s,
            )
            assert status == 206 and body == disk.model[first : first + 100]
        assert calls == [t]  # one chain open for three requests
        assert env.server.metrics.open_exports == 1
        # Idle: after a short linger the connection lets go of the export, but stays usable.
        wait_for(lambda: env.server.metrics.open_exports == 0)
        status, _, body = request(env, "/v1/exports/%s/raw" % t, [("Range", "bytes=0-9")], sock=s)
        assert status == 206 and body == disk.model[:10]
        assert calls == [t, t]
        # Another ticket on the same connection gets its own export.
        t2 = env.ticket()
        assert request(env, "/v1/exports/%s/raw" % t2, [("Range", "bytes=0-9")], sock=s)[0] == 206
        assert calls == [t, t, t2]
    finally:
        s.close()
    wait_for(lambda: env.server.metrics.open_exports == 0)


def test_block_granular_allocation_extents(env):
    t = env.ticket(base=True)
    status, _, body = request(
        env, "/v1/exports/%s/extents?context=allocation&granularity=block" % t
    )
    assert status == 200
    runs = [(r["start"], r["length"], r["hole"]) for r in json.loads(body)]
    assert runs == [(0, 8 * MiB, False), (8 * MiB, SIZE - 8 * MiB, True)]
    status, _, body = request(
        env, "/v1/exports/%s/extents?granularity=block&start=%d&length=%d" % (t, 3 * MiB, 6 * MiB)
    )
    runs = [(r["start"], r["length"], r["hole"]) for r in json.loads(body)]
    assert runs == [(3 * MiB, 5 * MiB, False), (8 * MiB, MiB, True)]
    status, _, body = request(env, "/v1/exports/%s/extents?granularity=page" % t)
    assert status == 400
