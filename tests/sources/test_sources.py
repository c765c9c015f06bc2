"""Sources read real servers and are judged by tools we did not write.

- agent NBD (libnbd, multi-conn, aio): against the agent daemon (plain and TLS with the pinned
  fingerprint) and against qemu-nbd (a server we did not write); data judged by `qemu-img convert`.
- agent HTTP (parallel blocks streams): against the agent's HttpServer on the same SR.
- xapi-nbd and xapi-export: against hostsim's XAPI NBD endpoint and export_raw_vdi, judged by the
  SR's own reader and qemu-img.
"""

import os
import signal
import subprocess
import time

import pytest

from orchestrator.sources.agent_http import AgentHttpSource
from orchestrator.sources.agent_nbd import AgentNbdSource
from orchestrator.sources.base import BLOCK_SIZE, SourceError, fold_cbt_bitmap
from orchestrator.sources.nbdclient import fetch_peer_certificate, fingerprint
from orchestrator.sources.vhd_file import VhdFileSource
from tests.fixtures.nbd import qemu_raw_bytes
from tests.fixtures.vhd import Level, pattern

MiB = 1 << 20
# The daemon may also serve HTTP (default port 8843): keep parallel agents off fixed ports.
HTTP_EPHEMERAL = ["--http-listen", "127.0.0.1:0"]


def read_all(source, blocks=None):
    plan = source.plan
    out = {}
    for i, data in source.read_blocks(blocks):
        assert i not in out, "block %d delivered twice" % i
        assert len(data) == plan.block_length(i)
        out[i] = bytes(data)
    return out


def assemble(plan, blocks):
    buf = bytearray(plan.size)
    for i, data in blocks.items():
        buf[i * BLOCK_SIZE : i * BLOCK_SIZE + len(data)] = data
    return bytes(buf)


def blocks_touched(writes, size):
    out = set()
    for off, length, *_ in writes:
        out.update(range(off // BLOCK_SIZE, (off + length - 1) // BLOCK_SIZE + 1))
    return sorted(b for b in out if b * BLOCK_SIZE < size)


# -- CBT folding -----------------------------------------------------------------------------------


def test_fold_cbt_bitmap_maps_64k_bits_to_2m_blocks():
    size = 5 * BLOCK_SIZE + 4096  # 6 blocks, the last one short
    bits = bytearray(-(-size // (64 << 10)) // 8 + 1)

    def setbit(n):
        bits[n >> 3] |= 0x80 >> (n & 7)

    setbit(0)  # block 0, first 64 KiB
    setbit(32 * 2 + 31)  # block 2, last 64 KiB
    setbit(32 * 5)  # block 5 (partial block)
    assert fold_cbt_bitmap(bytes(bits), size) == [0, 2, 5]
    assert fold_cbt_bitmap(bytes(len(bits)), size) == []
    assert fold_cbt_bitmap(b"\xff" * len(bits), size) == [0, 1, 2, 3, 4, 5]
    # a bitmap shorter than the disk (the disk grew): the bits it has still count
    assert fold_cbt_bitmap(b"\x80", size) == [0]


# -- agent NBD ---------------------------------------------------------------------------------------

WRITES = [(0, 65536, 0x11), (3 * MiB, 2 * MiB, 0x22), (9 * MiB + 4096, 8192, 0x33)]


@pytest.fixture
def qemu_disk(file_sr):
    vdi = file_sr.qemu_vdi(16 * MiB, WRITES)
    return vdi, file_sr.path(vdi)


@pytest.mark.parametrize("connections", [1, 3])
def test_agent_nbd_full_reads_allocated_blocks_like_qemu(
    file_sr, qemu_disk, agent_proc, tmp_path, connections
):
    vdi, path = qemu_disk
    agent = agent_proc([file_sr.root], extra=HTTP_EPHEMERAL)
    src = AgentNbdSource.from_url(agent.uri(agent.ticket(vdi)), connections=connections, depth=3)
    with src:
        plan = src.open()
        expected = qemu_raw_bytes(path, tmp_path)
        assert plan.size == len(expected)
        assert not plan.incremental
        assert plan.blocks == blocks_touched(WRITES, plan.size)
        got = read_all(src)
    assert assemble(plan, got) == expected
    assert src.bytes_read == sum(plan.block_length(i) for i in plan.blocks)


def test_agent_nbd_changed_context_lists_child_blocks(file_sr, agent_proc, tmp_path):
    size = 12 * MiB
    (root, leaf), models = file_sr.chain(
        [
            Level(size, writes=[(0, pattern(1, 4 * MiB)), (8 * MiB, pattern(2, MiB))]),
            Level(size, writes=[(2 * MiB + 512, pattern(3, 4096)), (10 * MiB, pattern(4, MiB))]),
        ]
    )
    agent = agent_proc([file_sr.root], extra=HTTP_EPHEMERAL)
    src = AgentNbdSource.from_url(agent.uri(agent.ticket(leaf, base=root)))
    src.incremental = True
    with src:
        plan = src.open()
        assert plan.incremental
        assert plan.blocks == [1, 5]
        got = read_all(src)
    for i, data in got.items():
        assert data == bytes(models[1][i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
    # A CBT-style block list overrides block status.
    src = AgentNbdSource.from_url(agent.uri(agent.ticket(leaf)))
    with src:
        plan = src.open(blocks=[5, 0, 5])
        assert plan.blocks == [0, 5]
        got = read_all(src)
    assert got[0] == bytes(models[1][:BLOCK_SIZE])


def test_agent_nbd_tls_is_pinned_by_fingerprint(
    file_sr, qemu_disk, agent_proc, tls_files, tmp_path
):
    vdi, path = qemu_disk
    agent = agent_proc(
        [file_sr.root],
        tls="require",
        extra=["--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"], *HTTP_EPHEMERAL],
    )
    der = fetch_peer_certificate(agent.host, agent.port)
    with open(tls_files["cert"]) as f:
        import ssl

        assert der == ssl.PEM_cert_to_DER_cert(f.read())
    good = fingerprint(der)
    src = AgentNbdSource(agent.host, agent.port, agent.ticket(vdi), fingerprint=good, tls=True)
    with src:
        plan = src.open()
        got = read_all(src)
    assert assemble(plan, got) == qemu_raw_bytes(path, tmp_path)
    bad = "00" * 32
    src = AgentNbdSource(agent.host, agent.port, agent.ticket(vdi), fingerprint=bad, tls=True)
    with pytest.raises(SourceError, match="does not match the pinned"):
        src.open()
    src.close()


def test_agent_nbd_agent_killed_mid_read_fails_after_retries(file_sr, agent_proc):
    vdi = file_sr.qemu_vdi(24 * MiB, [(0, 24 * MiB, 0x5A)])
    agent = agent_proc([file_sr.root], extra=HTTP_EPHEMERAL)
    src = AgentNbdSource.from_url(
        agent.uri(agent.ticket(vdi)), connections=2, depth=1, retries=2, backoff=0.05
    )
    src.max_in_flight = 1
    with src:
        src.open()
        it = src.read_blocks()
        next(it)
        os.kill(agent.pid, signal.SIGKILL)
        agent.proc.wait(10)
        with pytest.raises(SourceError, match="gave up after 2 retries"):
            for _ in it:
                pass


def test_plain_nbd_server_qemu_nbd(tmp_path):
    """qemu-nbd offers base:allocation but not fastpath:changed: a full read still works."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(10 * MiB)
        f.seek(4 * MiB + 100)
        f.write(b"x" * 5000)
    # qemu-nbd cannot report an ephemeral port: pick a free one.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", str(port), str(raw)]
    )
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        src = AgentNbdSource.from_url(f"nbd://127.0.0.1:{port}/disk", connections=1)
        with src:
            plan = src.open()
            assert plan.blocks == [2]  # qemu-nbd reports holes of a sparse file
            got = read_all(src)
        assert assemble(plan, got) == raw.read_bytes()
    finally:
        proc.terminate()
        proc.wait(10)


# -- agent HTTP ---------------------------------------------------------------------------------------


@pytest.fixture
def http_agent(file_sr):
    from agent.export import Counters
    from agent.http.server import HttpServer
    from agent.sr import FileSR
    from agent.tickets import TicketStore

    tickets = TicketStore()
    sr = FileSR([file_sr.root])
    counters = Counters()

    def open_export(t):
        return sr.open_export(t.vdi, t.sr, t.base, counters=counters, name=t.id)

    server = HttpServer(("127.0.0.1", 0), tickets, open_export)
    server.start()
    server.tickets_store = tickets
    yield server
    server.stop()


@pytest.mark.parametrize("streams", [1, 3])
def test_agent_http_blocks_streams(file_sr, http_agent, tmp_path, streams):
    size = 14 * MiB
    (root, leaf), models = file_sr.chain(
        [
            Level(size, writes=[(0, pattern(1, 6 * MiB)), (12 * MiB, pattern(2, MiB))]),
            Level(size, writes=[(4 * MiB + 512, pattern(3, 4096)), (8 * MiB, pattern(4, MiB))]),
        ]
    )
    host, port = http_agent.address
    t = http_agent.tickets_store.create(leaf, file_sr.sr, None, ttl=60)
    src = AgentHttpSource(f"http://{host}:{port}/v1/exports/{t.id}", streams=streams)
    with src:
        plan = src.open()
        assert plan.blocks == [0, 1, 2, 4, 6]
        got = read_all(src)
    assert assemble(plan, got) == bytes(models[1])
    t = http_agent.tickets_store.create(leaf, file_sr.sr, root, ttl=60)
    src = AgentHttpSource(
        f"http://{host}:{port}/v1/exports/{t.id}", incremental=True, streams=streams
    )
    with src:
        plan = src.open()
        assert plan.incremental and plan.blocks == [2, 4]
        got = read_all(src)
    assert got[2] == bytes(models[1][2 * BLOCK_SIZE : 3 * BLOCK_SIZE])
    # An explicit list with an unallocated block: the complete stream proves it reads as zeros.
    t = http_agent.tickets_store.create(leaf, file_sr.sr, None, ttl=60)
    src = AgentHttpSource(f"http://{host}:{port}/v1/exports/{t.id}", streams=streams)
    with src:
        src.open(blocks=[3, 4])
        got = read_all(src)
    assert got[3] == bytes(BLOCK_SIZE)
    assert got[4] == bytes(models[1][4 * BLOCK_SIZE : 5 * BLOCK_SIZE])


def test_agent_http_revoked_ticket_is_a_clear_failure(file_sr, http_agent):
    vdi = file_sr.qemu_vdi(8 * MiB, [(0, 8 * MiB, 0x42)])
    host, port = http_agent.address
    t = http_agent.tickets_store.create(vdi, file_sr.sr, None, ttl=60)
    src = AgentHttpSource(f"http://{host}:{port}/v1/exports/{t.id}", retries=1, backoff=0.01)
    with src:
        src.open()
        http_agent.tickets_store.revoke(t.id)
        with pytest.raises(SourceError, match="gave up after 1 retries"):
            read_all(src)


# -- hostsim: xapi-nbd and export_raw_vdi --------------------------------------------------------------


@pytest.fixture
def sim_vdi(hostsim_pool):
    from hostsim import guest

    pool = hostsim_pool
    vm = pool.create_vm("src", [10 * MiB])
    vdi = pool.vm_vdis(vm)[0]
    guest.guest_write(pool, vdi, "mixed", count=6, length=256 << 10, seed=3)
    uuid = pool.api.store.field("VDI", vdi, "uuid")
    return pool, vdi, uuid


def test_xapi_nbd_reads_every_block(sim_vdi, xapi_session):
    from orchestrator.sources.xapi_nbd import XapiNbdSource

    pool, vdi, uuid = sim_vdi
    src = XapiNbdSource(xapi_session.xenapi, vdi, connections=2)
    with src:
        plan = src.open()
        assert plan.blocks == list(range(5))
        got = read_all(src)
    assert assemble(plan, got) == pool.sr.read(uuid, 0, plan.size)


def test_xapi_export_stream_full_and_delta(sim_vdi, xapi_session, tmp_path):
    from hostsim import guest
    from orchestrator.sources.xapi_export import XapiExportSource

    pool, vdi, uuid = sim_vdi
    x = xapi_session.xenapi
    url = pool.server.url
    src = XapiExportSource(url, xapi_session._session, uuid)
    with src:
        plan = src.open()
        got = read_all(src)
    expected = pool.sr.read(uuid, 0, plan.size)
    assert assemble(plan, got) == expected
    assert plan.blocks == sorted(pool.sr.allocated_blocks(uuid))
    snap = x.VDI.snapshot(vdi, {})
    snap_uuid = x.VDI.get_uuid(snap)
    writes = guest.guest_write(pool, vdi, "random", count=2, length=64 << 10, seed=9)
    snap2 = x.VDI.snapshot(vdi, {})
    src = XapiExportSource(url, xapi_session._session, x.VDI.get_uuid(snap2), base_uuid=snap_uuid)
    with src:
        plan = src.open()
        assert plan.incremental
        assert plan.blocks == blocks_touched(writes, plan.size)
        got = read_all(src)
    new = pool.sr.read(x.VDI.get_uuid(snap2), 0, plan.size)
    for i, data in got.items():
        assert data == new[i * BLOCK_SIZE : i * BLOCK_SIZE + len(data)]


def test_vhd_file_source_matches_qemu(file_sr, qemu_disk, tmp_path):
    vdi, path = qemu_disk
    src = VhdFileSource(path)
    with src:
        plan = src.open()
        got = read_all(src)
    assert assemble(plan, got) == qemu_raw_bytes(path, tmp_path)
    assert plan.blocks == blocks_touched(WRITES, plan.size)


def test_agent_nbd_hung_server_is_a_timeout_not_a_hang(file_sr, agent_proc):
    """A stopped agent still accepts TCP connections (kernel backlog) but never answers."""
    from orchestrator.sources.base import SourceUnavailable

    vdi = file_sr.qemu_vdi(4 * MiB, [(0, MiB, 0x11)])
    agent = agent_proc([file_sr.root], extra=HTTP_EPHEMERAL)
    uri = agent.uri(agent.ticket(vdi))
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        src = AgentNbdSource.from_url(uri, io_timeout=1)
        with pytest.raises(SourceUnavailable, match="no NBD handshake within 1 s"):
            src.open()
        src.close()
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    src = AgentNbdSource.from_url(uri, io_timeout=5)
    with src:
        src.open()
        assert read_all(src)[0][:MiB] == b"\x11" * MiB


def test_agent_http_tls_is_pinned_by_fingerprint(file_sr, tls_files):
    import ssl

    from agent.http.server import HttpServer
    from agent.sr import FileSR
    from agent.tickets import TicketStore

    vdi = file_sr.qemu_vdi(6 * MiB, [(2 * MiB, MiB, 0x77)])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_files["cert"], tls_files["key"])
    tickets = TicketStore()
    sr = FileSR([file_sr.root])
    server = HttpServer(
        ("127.0.0.1", 0),
        tickets,
        lambda t: sr.open_export(t.vdi, t.sr, t.base, name=t.id),
        tls_context=ctx,
        tls_mode="require",
    )
    server.start()
    try:
        host, port = server.address
        with open(tls_files["cert"]) as f:
            good = fingerprint(ssl.PEM_cert_to_DER_cert(f.read()))
        t = tickets.create(vdi, file_sr.sr, None, ttl=60)
        src = AgentHttpSource(f"https://{host}:{port}/v1/exports/{t.id}", fingerprint=good)
        with src:
            plan = src.open()
            assert plan.blocks == [1]
            assert read_all(src)[1][:MiB] == b"\x77" * MiB
        src = AgentHttpSource(f"https://{host}:{port}/v1/exports/{t.id}", fingerprint="ab" * 32)
        with pytest.raises(SourceError, match="does not match the pinned"):
            src.open()
    finally:
        server.stop()
