"""hostsim's "processes" model of XAPI's export (tapdisk + vhd-tool + stunnel hop) against "inline".

The processes model must send the same stream as the inline one (footer uuid/timestamp aside: every
export gets a fresh footer), and the streams are judged by peers we did not write: qemu-img (check,
compare, map of the exported VHD) against libvhdi (pyvhdi with set_parent) reading the source chain.
Failures (the client going away, tapdisk or vhd-tool dying) must end the export with a short body,
leave no process behind and leave hostsim serving. Guest writes are 64 KiB aligned, so libvhdi's
bitmap bug stays out of the way, and chains have equal sizes.
"""

import errno
import json
import mmap
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import XenAPI

from agent.vhd import format as fmt
from hostsim import datapath, guest
from hostsim.xapiexport import blkif, layout, pipeline, tapdisk

MiB = 1 << 20
KiB = 1 << 10
TIMEOUT = 60


# -- helpers ------------------------------------------------------------------------------------------


def run(*cmd):
    if shutil.which(cmd[0]) is None:
        pytest.skip("%s is not installed (scripts/setup-system.sh installs it)" % cmd[0])
    return subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=True)


def libvhdi_content(pyvhdi, pool, uuid):
    files = []
    try:
        for vf in pool.sr.chain(uuid):
            f = pyvhdi.file()
            f.open(vf.path)
            files.append(f)
        for child, parent in zip(files, files[1:]):
            child.set_parent(parent)
        return files[0].read_buffer_at_offset(files[0].get_media_size(), 0)
    finally:
        for f in files:
            f.close()


def connect(pool, tls, rcvbuf=None):
    host, port = pool.server.server_address[:2]
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(TIMEOUT)
    raw.connect(("127.0.0.1", port))
    if not tls:
        return raw
    ctx = ssl.create_default_context(cafile=pool.cert_path)
    ctx.check_hostname = False
    return ctx.wrap_socket(raw)


def start_get(sock, session, **query):
    """Send the GET, read the headers; returns (status, headers dict, bytes of body already read)."""
    q = "&".join("%s=%s" % kv for kv in {"session_id": session, **query}.items())
    sock.sendall(("GET /export_raw_vdi?%s HTTP/1.1\r\nHost: x\r\n\r\n" % q).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed before the headers"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def read_body(sock, length, already=b""):
    got = bytearray(already)
    while len(got) < length:
        try:
            chunk = sock.recv(min(1 << 20, length - len(got)))
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        got += chunk
    return bytes(got)


def export(pool, session, tls=False, **query):
    with connect(pool, tls) as s:
        status, headers, body = start_get(s, session, **query)
        assert status == 200, (status, body[:200])
        length = int(headers["Content-Length"])
        data = read_body(s, length, body)
        assert len(data) == length
        return data


def same_stream(a, b):
    """Equal streams, except the fresh footer each export gets (uuid, timestamp, checksum)."""
    assert len(a) == len(b)
    assert a[512:-512] == b[512:-512]
    fa, fb = fmt.Footer.parse(a[:512]), fmt.Footer.parse(a[-512:])
    ga = fmt.Footer.parse(b[:512])
    assert a[:512] == a[-512:] and b[:512] == b[-512:]
    for name in ("data_offset", "original_size", "current_size", "disk_type", "cylinders"):
        assert getattr(fa, name) == getattr(ga, name) == getattr(fb, name)


def wait_gone(pids, timeout=TIMEOUT):
    """Bounded wait for processes to be gone (reaped). Not a speed check: a cleanup deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive and not pipeline.live():
            return
        time.sleep(0.05)
    raise AssertionError("left behind: %s, live pipelines %s" % (alive, pipeline.live()))


def wait_pipeline(timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        running = pipeline.live()
        if running and all(running[0]):
            return running[0]
        time.sleep(0.02)
    raise AssertionError("no export pipeline started")


def settled(pool, ref, timeout=TIMEOUT):
    """The task's record once the handler finished it (it ends after the client has its bytes)."""
    end = time.monotonic() + timeout
    while pool.api.store.get("task", ref)["status"] == "pending" and time.monotonic() < end:
        time.sleep(0.02)
    return pool.api.store.get("task", ref)


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def disk(hostsim_pool, xapi_session):
    """A 10 MiB disk on a 2-deep chain (data in both levels), its snapshot, and the pool."""
    pool, x = hostsim_pool, xapi_session.xenapi
    vm = pool.create_vm("alpha", [10 * MiB])
    vdi = pool.vm_vdis(vm)[0]
    guest.guest_write(pool, vdi, "mixed", count=12, length=128 * KiB, seed=7)
    snap = x.VDI.snapshot(vdi, {})
    guest.guest_write(
        pool, vdi, "text", count=5, length=64 * KiB, seed=8, region=(4 * MiB, 8 * MiB)
    )
    return vdi, snap


@pytest.fixture
def tls_pool(tmp_path):
    from hostsim.host import Pool

    pool = Pool(tmp_path / "tls")
    pool.start(tls=True)
    session = XenAPI.Session(pool.server.url, ignore_ssl=True)
    session.xenapi.login_with_password("root", "hostsim", "2.21", "pytest")
    yield pool, session
    try:
        session.xenapi.session.logout()
    except Exception:
        pass
    pool.stop()


def big_disk(pool, size=24 * MiB):
    """A fully allocated disk: long enough a stream to interrupt it mid-way."""
    vm = pool.create_vm("big", [size])
    vdi = pool.vm_vdis(vm)[0]
    guest.guest_write(pool, vdi, "random", count=size // MiB, length=MiB, seed=3)
    return vdi


# -- the stream ---------------------------------------------------------------------------------------


def test_default_model_is_processes(hostsim_pool):
    assert datapath.export_model(hostsim_pool) == "processes"
    with pytest.raises(ValueError):
        datapath.set_export_model(hostsim_pool, "threads")


def test_full_export_same_as_inline_and_judged_by_peers(
    hostsim_pool, xapi_session, disk, tmp_path, pyvhdi_module
):
    pool, s = hostsim_pool, xapi_session.handle
    vdi, _ = disk
    datapath.set_export_model(pool, "inline")
    inline = export(pool, s, vdi=vdi, format="vhd")
    datapath.set_export_model(pool, "processes")
    procs = export(pool, s, vdi=vdi, format="vhd")
    same_stream(inline, procs)
    out = tmp_path / "procs.vhd"
    out.write_bytes(procs)
    raw = tmp_path / "source.raw"
    raw.write_bytes(libvhdi_content(pyvhdi_module, pool, xapi_session.xenapi.VDI.get_uuid(vdi)))
    run("qemu-img", "info", "-f", "vpc", str(out))  # (qemu has no check for vpc)
    run("qemu-img", "compare", "-f", "vpc", "-F", "raw", str(out), str(raw))
    assert not pipeline.live()


def test_export_with_base_same_as_inline_and_judged_by_peers(
    hostsim_pool, xapi_session, disk, tmp_path, pyvhdi_module
):
    pool, s = hostsim_pool, xapi_session.handle
    x = xapi_session.xenapi
    vdi, snap = disk
    snap2 = x.VDI.snapshot(vdi, {})  # the delta snap -> snap2 holds the writes made after snap
    datapath.set_export_model(pool, "inline")
    inline = export(pool, s, vdi=snap2, format="vhd", base=snap)
    datapath.set_export_model(pool, "processes")
    procs = export(pool, s, vdi=snap2, format="vhd", base=x.VDI.get_uuid(snap))
    same_stream(inline, procs)
    out = tmp_path / "delta.vhd"
    out.write_bytes(procs)
    run("qemu-img", "info", "-f", "vpc", str(out))
    source = libvhdi_content(pyvhdi_module, pool, x.VDI.get_uuid(snap2))
    mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "vpc", str(out)).stdout)
    data = [m for m in mapped if m["data"]]
    assert data, "the delta has no data"
    conv = tmp_path / "delta.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(out), str(conv))
    delta = conv.read_bytes()
    for m in data:
        a, n = m["start"], m["length"]
        assert delta[a : a + n] == source[a : a + n]
    # the writes after the first snapshot (4..8 MiB) are all inside the delta
    written = {
        o // layout.BLOCK
        for o in range(4 * MiB, 8 * MiB, 64 * KiB)
        if source[o : o + 64 * KiB] != bytes(64 * KiB)
    }
    carried = {
        o // layout.BLOCK
        for m in data
        for o in range(m["start"], m["start"] + m["length"], 64 * KiB)
    }
    assert written <= carried


def test_tls_export_through_the_stunnel_hop_same_as_inline(tls_pool, pyvhdi_module, tmp_path):
    pool, session = tls_pool
    x = session.xenapi
    vm = pool.create_vm("tls", [6 * MiB])
    vdi = pool.vm_vdis(vm)[0]
    guest.guest_write(pool, vdi, "binary", count=6, length=256 * KiB, seed=11)
    datapath.set_export_model(pool, "inline")
    inline = export(pool, session.handle, tls=True, vdi=vdi, format="vhd")
    datapath.set_export_model(pool, "processes")
    procs = export(pool, session.handle, tls=True, vdi=vdi, format="vhd")
    same_stream(inline, procs)
    out, raw = tmp_path / "t.vhd", tmp_path / "t.raw"
    out.write_bytes(procs)
    raw.write_bytes(libvhdi_content(pyvhdi_module, pool, x.VDI.get_uuid(vdi)))
    run("qemu-img", "compare", "-f", "vpc", "-F", "raw", str(out), str(raw))


def test_task_progress_and_success(hostsim_pool, xapi_session, disk):
    pool = hostsim_pool
    vdi, _ = disk
    task = pool.api.new_task("export")
    export(pool, xapi_session.handle, vdi=vdi, format="vhd", task_id=task)
    rec = settled(pool, task)
    assert rec["status"] == "success"
    assert float(rec["progress"]) == 1.0


# -- failures -----------------------------------------------------------------------------------------


def _interrupted(pool, session, x, tls, action):
    """Start an export of a big disk with a tiny receive window, do `action(pids, sock)` mid-stream,
    read what comes; returns (bytes received, Content-Length, task record)."""
    vdi = big_disk(pool)
    task = pool.api.new_task("export")
    sock = connect(pool, tls, rcvbuf=4096)
    try:
        status, headers, body = start_get(sock, session, vdi=vdi, format="vhd", task_id=task)
        assert status == 200
        length = int(headers["Content-Length"])
        body += sock.recv(64 * KiB)
        pids = wait_pipeline()
        action(pids, sock)
        got = b"" if sock.fileno() < 0 else read_body(sock, length, body)
    finally:
        sock.close()
    wait_gone(pids)
    return got, length, settled(pool, task), vdi


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_client_going_away_ends_the_pipeline(request, tls):
    if tls:
        pool, session = request.getfixturevalue("tls_pool")
    else:
        pool, session = (
            request.getfixturevalue("hostsim_pool"),
            request.getfixturevalue("xapi_session"),
        )
    x = session.xenapi

    def hang_up(pids, sock):
        sock.close()

    _, _, task, vdi = _interrupted(pool, session.handle, x, tls, hang_up)
    assert task["status"] == "failure"
    # hostsim still serves: the next export is whole
    data = export(pool, session.handle, tls=tls, vdi=vdi, format="vhd")
    assert len(data) > 24 * MiB


@pytest.mark.parametrize("victim", [0, 1], ids=["tapdisk", "vhd-tool"])
def test_a_dying_child_cuts_the_stream_short(hostsim_pool, xapi_session, victim):
    pool, x = hostsim_pool, xapi_session.xenapi

    def kill(pids, sock):
        os.kill(pids[victim], signal.SIGKILL)

    got, length, task, vdi = _interrupted(pool, xapi_session.handle, x, False, kill)
    assert len(got) < length  # a short body, never a complete-looking one
    assert task["status"] == "failure"
    assert "VDI_IO_ERROR" in task["error_info"]
    assert len(export(pool, xapi_session.handle, vdi=vdi, format="vhd")) == length


# -- the block path -----------------------------------------------------------------------------------


def test_split_read_follows_blktap_limits():
    reqs = blkif.split_read(4 * MiB, 2 * MiB)
    assert len(reqs) == 47
    assert all(n == 44 * KiB for _, n, _ in reqs[:-1]) and reqs[-1][1] == 24 * KiB
    assert [o for o, _, _ in reqs] == [4 * MiB + i * 44 * KiB for i in range(47)]
    # a buffer position inside a page: the first request ends at the 11th page it touches
    first = blkif.split_read(0, 64 * KiB, buf_offset=1024)[0]
    assert first == (0, 11 * 4096 - 1024, 1024)
    with pytest.raises(ValueError):
        blkif.split_read(100, 512)
    assert blkif.check_request(0, 89, 1000) == -errno.EINVAL
    assert blkif.check_request(0, 0, 1000) == -errno.EINVAL
    assert blkif.check_request(990, 11, 1000) == -errno.EIO
    assert blkif.check_request(912, 88, 1000) == 0
    assert blkif.check_request(0, 8, 1000, slot=32) == -errno.EINVAL
    assert blkif.RING_DATA_BYTES == 32 * 44 * KiB


def _spawn_tapdisk(path):
    """tapdisk on a ring: (process, our end of the ring socket, the shared data pages)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    data_fd = os.memfd_create("test-ring")
    os.ftruncate(data_fd, blkif.RING_DATA_BYTES)
    data = mmap.mmap(data_fd, blkif.RING_DATA_BYTES)
    cmd = [sys.executable, "-m", "hostsim.xapiexport.tapdisk", "--ring-fd", str(theirs.fileno())]
    cmd += ["--data-fd", str(data_fd), "--vhd", str(path)]
    proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno(), data_fd], stderr=subprocess.PIPE)
    theirs.close()
    os.close(data_fd)
    mine.settimeout(TIMEOUT)
    return proc, mine, data


def _recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "tapdisk closed the ring"
        out += chunk
    return bytes(out)


def test_tapdisk_serves_the_chain_and_refuses_bad_requests(
    hostsim_pool, xapi_session, disk, pyvhdi_module
):
    pool = hostsim_pool
    vdi, _ = disk
    uuid = xapi_session.xenapi.VDI.get_uuid(vdi)
    source = libvhdi_content(pyvhdi_module, pool, uuid)
    size_sectors = len(source) // 512
    proc, ring, data = _spawn_tapdisk(pool.sr.vhd_path(uuid))
    try:
        reqs = [  # (id, slot, first sector, count)
            (1, 0, 0, 88),  # the largest request
            (2, 31, 4 * MiB // 512 + 8, 40),  # inside the second level's writes, last slot
            (3, 1, 0, 89),  # more than 11 pages: EINVAL
            (4, 2, size_sectors - 8, 16),  # past the end: EIO
            (5, 32, 0, 8),  # no such slot: EINVAL
            (6, 3, size_sectors - 88, 88),  # the last sectors
        ]
        ring.sendall(b"".join(blkif.REQ.pack(*r) for r in reqs))
        answers = dict(blkif.RSP.unpack(_recv_exact(ring, blkif.RSP.size)) for _ in reqs)
        assert answers[3] == answers[5] == -errno.EINVAL
        assert answers[4] == -errno.EIO
        for rid, slot, first, count in reqs:
            if rid in (3, 4, 5):
                continue
            assert answers[rid] == 0
            a = slot * blkif.MAX_REQUEST_BYTES
            assert data[a : a + count * 512] == source[first * 512 : (first + count) * 512]
        ring.sendall(b"\x00" * 7)  # half a request, then the ring closes: tapdisk just ends
        ring.close()
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
        data.close()


def test_tapdisk_fails_cleanly_on_a_missing_vhd(tmp_path):
    proc, ring, data = _spawn_tapdisk(tmp_path / "nope.vhd")
    try:
        assert proc.wait(TIMEOUT) == 1
        assert b"cannot open" in proc.stderr.read()
        assert ring.recv(16) == b""
    finally:
        ring.close()
        proc.stderr.close()
        data.close()


def _o_direct_works(directory):
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = os.path.join(directory, "probe")
    with open(probe, "wb") as f:
        f.write(b"\x01" * 8192)
    try:
        fd = os.open(probe, os.O_RDONLY | flag)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [buf], 0)
            return True
        except OSError:
            return False
        finally:
            buf.close()
    finally:
        os.close(fd)
        os.unlink(probe)


def test_tapdisk_reads_with_o_direct_where_the_file_system_allows(hostsim_pool, xapi_session, disk):
    pool = hostsim_pool
    vdi, _ = disk
    uuid = xapi_session.xenapi.VDI.get_uuid(vdi)
    if not _o_direct_works(pool.sr.path):
        pytest.skip("the test file system refuses O_DIRECT: tapdisk falls back (not testable here)")
    d = tapdisk.Disk(pool.sr.vhd_path(uuid))
    try:
        assert len(d.levels) == 2
        assert all(d.direct), d.notes
        mem = mmap.mmap(-1, blkif.MAX_REQUEST_BYTES)
        try:
            d.read_into(0, 88, memoryview(mem))
            assert all(d.direct), d.notes  # the reads themselves did not fall back
            assert bytes(mem) == pool.sr.read(uuid, 0, blkif.MAX_REQUEST_BYTES)
        finally:
            mem.close()
    finally:
        d.close()


def test_serve_flag_selects_the_model():
    from hostsim.cli import build_parser

    p = build_parser()
    assert p.parse_args(["serve"]).export_model == "processes"
    assert p.parse_args(["serve", "--export-model", "inline"]).export_model == "inline"
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--export-model", "threads"])


def test_keep_alive_connection_serves_a_second_export(hostsim_pool, xapi_session, disk):
    """vhd-tool wrote on the client's socket itself; the connection stays usable afterwards."""
    import http.client

    pool = hostsim_pool
    vdi, _ = disk
    port = pool.server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        q = "/export_raw_vdi?session_id=%s&vdi=%s&format=vhd" % (xapi_session.handle, vdi)
        bodies = []
        for _ in range(2):
            conn.request("GET", q)
            r = conn.getresponse()
            assert r.status == 200
            bodies.append(r.read())
        same_stream(bodies[0], bodies[1])
    finally:
        conn.close()


def test_a_chain_tapdisk_cannot_open_fails_the_export(hostsim_pool, xapi_session, disk):
    """A leaf whose footer checksum is wrong: hostsim's own reader does not check it, tapdisk and
    vhd-tool (agent.vhd) refuse it; the client gets the 200 and a short body, the task fails."""
    pool = hostsim_pool
    vdi, _ = disk
    uuid = xapi_session.xenapi.VDI.get_uuid(vdi)
    path = pool.sr.vhd_path(uuid)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for at in (0, size - 512):
            f.seek(at + 64)  # the footer's checksum field
            old = f.read(4)
            f.seek(at + 64)
            f.write(bytes(b ^ 0xFF for b in old))
    task = pool.api.new_task("export")
    with connect(pool, False) as s:
        status, headers, body = start_get(
            s, xapi_session.handle, vdi=vdi, format="vhd", task_id=task
        )
        assert status == 200
        got = read_body(s, int(headers["Content-Length"]), body)
    assert len(got) < int(headers["Content-Length"])
    rec = settled(pool, task)
    assert rec["status"] == "failure" and "VDI_IO_ERROR" in rec["error_info"]
    wait_gone([])


def test_vhdtool_writes_whole_buffers_to_a_non_blocking_socket():
    """A server socket with a timeout is non-blocking underneath: vhd-tool waits for room (EAGAIN)."""
    import threading

    from hostsim.xapiexport import procutil

    a, b = socket.socketpair()
    a.setblocking(False)
    data = os.urandom(4 * MiB)
    got = bytearray()

    def reader():
        while len(got) < len(data):
            chunk = b.recv(MiB)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    try:
        procutil.write_all(a.fileno(), data)
    finally:
        t.join(TIMEOUT)
        a.close()
        b.close()
    assert bytes(got) == data


def _fake_tapdisk(answer):
    """vhd-tool's Tapdev against a stand-in tapdisk thread: answer(request tuple, sock, data)."""
    import threading

    from hostsim.xapiexport import vhdtool

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mine.settimeout(TIMEOUT)
    theirs.settimeout(TIMEOUT)
    data = bytearray(blkif.RING_DATA_BYTES)

    def serve():
        buf = b""
        try:
            while True:
                chunk = theirs.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= blkif.REQ.size:
                    req, buf = blkif.REQ.unpack(buf[: blkif.REQ.size]), buf[blkif.REQ.size :]
                    if answer(req, theirs, data) is False:
                        theirs.close()
                        return
        except OSError:
            return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return vhdtool.Tapdev(mine, memoryview(data), 4 * MiB), mine, theirs, t


@pytest.mark.parametrize(
    "fault, error",
    [("wrong id", blkif.RingError), ("eio", OSError), ("hang up", blkif.RingError)],
)
def test_vhdtool_refuses_a_misbehaving_tapdisk(fault, error):
    def answer(req, sock, data):
        rid, slot, first, count = req
        if fault == "hang up":
            return False
        if fault == "wrong id":
            sock.sendall(blkif.RSP.pack(rid + 1000, 0))
        else:
            sock.sendall(blkif.RSP.pack(rid, -errno.EIO))

    dev, mine, theirs, t = _fake_tapdisk(answer)
    buf = mmap.mmap(-1, 2 * MiB)
    view = memoryview(buf)
    try:
        # "hang up": tapdisk closes the ring while the reader may still be sending requests
        # (EPIPE) or waiting for answers (EOF): both are "tapdisk went away"
        with pytest.raises(error):
            dev.read_into(0, view)
    finally:
        mine.close()
        t.join(TIMEOUT)
        theirs.close()
        view.release()
        buf.close()


def test_vhdtool_keeps_at_most_a_ring_of_requests_in_flight():
    """The block layer stops the queue when the ring is full: never more than 32 outstanding, every
    request at most 44 KiB, data copied from the request's slot; answered out of order."""
    import threading

    outstanding, peak, lock = [], [0], threading.Lock()

    def answer(req, sock, data):
        rid, slot, first, count = req
        assert 0 < count <= blkif.MAX_REQUEST_SECTORS
        with lock:
            # a slot the reader still waits on, or beyond the ring: more than a ring in flight
            assert 0 <= slot < blkif.BLKTAP_RING_SIZE
            assert slot not in {r[1] for r in outstanding}
            outstanding.append(req)
            peak[0] = max(peak[0], len(outstanding))
            if len(outstanding) < blkif.BLKTAP_RING_SIZE and first + count < 4 * MiB // 512:
                return  # hold it: the reader must keep sending until the ring is full
            batch, outstanding[:] = list(reversed(outstanding)), []
        for r_id, r_slot, r_first, r_count in batch:
            a = r_slot * blkif.MAX_REQUEST_BYTES
            for k in range(r_count):  # each sector holds its own number
                data[a + k * 512 : a + k * 512 + 8] = (r_first + k).to_bytes(8, "big")
            sock.sendall(blkif.RSP.pack(r_id, 0))

    dev, mine, theirs, t = _fake_tapdisk(answer)
    buf = mmap.mmap(-1, 2 * MiB)
    try:
        dev.read_into(2 * MiB, memoryview(buf))
        for k in range(0, 2 * MiB // 512, 97):
            assert int.from_bytes(buf[k * 512 : k * 512 + 8], "big") == 2 * MiB // 512 + k
        assert peak[0] == blkif.BLKTAP_RING_SIZE
    finally:
        mine.close()
        t.join(TIMEOUT)
        theirs.close()
        buf.close()


def test_concurrent_exports_each_get_their_pipeline(hostsim_pool, xapi_session, disk):
    import threading

    pool = hostsim_pool
    vdi, snap = disk
    results, errors = {}, []

    def one(name, **q):
        try:
            results[name] = export(pool, xapi_session.handle, vdi=vdi, format="vhd", **q)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=("a",)), threading.Thread(target=one, args=("b",))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert not errors
    same_stream(results["a"], results["b"])
    wait_gone([])


def test_tapdisk_falls_back_to_buffered_reads_when_o_direct_is_refused(
    hostsim_pool, xapi_session, disk, monkeypatch
):
    """As tapdisk's drivers do: EINVAL for O_DIRECT at open (one file) or at a read (the other file)
    switches that file to buffered reads, with a note; the data stays right."""
    pool = hostsim_pool
    vdi, _ = disk
    uuid = xapi_session.xenapi.VDI.get_uuid(vdi)
    leaf, parent = [vf.path for vf in pool.sr.chain(uuid)]
    real_open, real_preadv = os.open, os.preadv
    direct_fds = set()

    def fake_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            if path == leaf:
                raise OSError(errno.EINVAL, "O_DIRECT refused (test)")
            fd = real_open(path, flags & ~os.O_DIRECT, *a)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, *a)

    def fake_preadv(fd, bufs, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "unaligned for O_DIRECT (test)")
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(tapdisk.os, "open", fake_open)
    monkeypatch.setattr(tapdisk.os, "preadv", fake_preadv)
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    d = tapdisk.Disk(pool.sr.vhd_path(uuid))
    try:
        assert d.direct == [False, True]
        mem = mmap.mmap(-1, 2 * MiB)
        try:
            for first in range(0, d.size_sectors, blkif.MAX_REQUEST_SECTORS):
                n = min(blkif.MAX_REQUEST_SECTORS, d.size_sectors - first)
                view = memoryview(mem)[: n * 512]
                d.read_into(first, n, view)
                assert bytes(view) == pool.sr.read(uuid, first * 512, n * 512)
                view.release()
        finally:
            mem.close()
        assert d.direct == [False, False]
        assert len(d.notes) == 2 and all("buffered" in n for n in d.notes)
    finally:
        d.close()


def test_base_that_is_not_an_ancestor_gives_the_full_stream(hostsim_pool, xapi_session, disk):
    pool, s = hostsim_pool, xapi_session.handle
    vdi, _ = disk
    other = pool.vm_vdis(pool.create_vm("other", [4 * MiB]))[0]
    datapath.set_export_model(pool, "inline")
    inline = export(pool, s, vdi=vdi, format="vhd", base=other)
    datapath.set_export_model(pool, "processes")
    procs = export(pool, s, vdi=vdi, format="vhd", base=other)
    same_stream(inline, procs)
    same_stream(procs, export(pool, s, vdi=vdi, format="vhd"))
