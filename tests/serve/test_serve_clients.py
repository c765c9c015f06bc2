"""``fastpath serve`` judged by real NBD clients: nbdcopy, qemu-img, nbdinfo, libnbd.

Every test runs a ``fastpath serve`` subprocess on a restore point made by the repository's
writer (tests.repo_ops.helpers.backup): local and moto S3, encrypted and not. What the clients
read is compared with the disk model and with ``fastpath restore`` of the same point;
``nbdinfo --map`` is compared with the index (a zero chunk, even one that was written, is a
hole).
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import subprocess
import sys
import threading

import nbd
import pytest

from agent.nbd import wire as w
from orchestrator.repo.codec import CHUNK_SIZE
from tests.serve.conftest import TIMEOUT, cli_env


def run(cmd, **kw):
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, **kw
    )
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"
    return proc


def expected_map(disk) -> list[dict]:
    """base:allocation runs of the disk as nbdinfo --map --json prints them."""
    runs: list[list[int]] = []
    for i in range(disk.count):
        kind = 0 if any(disk.chunk(i)) else 3
        n = disk.length(i)
        if runs and runs[-1][2] == kind:
            runs[-1][1] += n
        else:
            runs.append([i * CHUNK_SIZE, n, kind])
    return [{"offset": o, "length": n, "type": t} for o, n, t in runs]


def test_clients_read_what_restore_writes(point, serve, tmp_path):
    disk = point.disks[0]
    srv = serve(point.url, point.id, "--disk", disk.vdi, env=point.env)
    assert srv.ready["default_export"] == disk.vdi
    # nbdcopy (multi-conn, block status first) == the model == fastpath restore
    copied = tmp_path / "copied.raw"
    run(["nbdcopy", srv.uri(), copied])
    assert copied.read_bytes() == bytes(disk.data)
    restored = tmp_path / "restored.raw"
    run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "restore",
            point.url,
            point.id,
            "--disk",
            disk.vdi,
            "-o",
            restored,
        ],
        env=cli_env(point.env),
    )
    assert restored.read_bytes() == copied.read_bytes()
    # qemu-img compare and convert, against the NBD export itself
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", restored, srv.uri()])
    converted = tmp_path / "converted.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri(), converted])
    assert converted.read_bytes() == bytes(disk.data)
    # nbdinfo --map: exactly the index (holes stay holes)
    got = json.loads(run(["nbdinfo", "--map", "--json", srv.uri()]).stdout)
    assert [{k: e[k] for k in ("offset", "length", "type")} for e in got] == expected_map(disk)
    # the second disk, by its export name
    other = point.disks[1]
    copied2 = tmp_path / "other.raw"
    run(["nbdcopy", srv.uri(other.vdi), copied2])
    assert copied2.read_bytes() == bytes(other.data)
    assert srv.alive()


def test_four_parallel_readers(point, serve):
    """Four libnbd clients read the whole disk at once, in different orders and sizes."""
    disk = point.disks[0]
    srv = serve(point.url, point.id, "--disk", disk.vdi, "--cache-mib", "8", env=point.env)
    want = hashlib.sha256(disk.data).hexdigest()
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(srv.uri())
            assert h.can_multi_conn()
            size = h.get_size()
            step = [1 << 20, 3 << 20, 4096 * 7, 5 << 20][k]
            offsets = list(range(0, size, step))
            if k % 2:
                offsets.reverse()
            out = bytearray(size)
            for off in offsets:
                n = min(step, size - off)
                out[off : off + n] = h.pread(n, off)
            h.shutdown()
            results[k] = hashlib.sha256(out).hexdigest()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors, errors
    assert results == dict.fromkeys(range(4), want)


def _handshake(port: int) -> socket.socket:
    """A bare fixed-newstyle client (NBD_OPT_EXPORT_NAME of the default export)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    greeting = _recv_exact(s, 18)
    assert struct.unpack(">QQH", greeting)[:2] == (w.NBDMAGIC, w.IHAVEOPT)
    s.sendall(struct.pack(">I", w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES))
    s.sendall(struct.pack(">QII", w.IHAVEOPT, w.OPT_EXPORT_NAME, 0))
    size, _flags = struct.unpack(">QH", _recv_exact(s, 10))
    assert size > 0
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += got
    return buf


def test_client_disconnecting_mid_read_leaves_the_server_serving(local_point, serve, tmp_path):
    disk = local_point.disks[0]
    srv = serve(local_point.url, local_point.id, "--disk", disk.vdi, env=local_point.env)
    for _ in range(3):
        s = _handshake(srv.port)
        for k in range(8):  # 8 reads of 8 MiB in flight, then gone after a few bytes
            s.sendall(struct.pack(">IHHQQI", w.REQUEST_MAGIC, 0, w.CMD_READ, k, 0, 8 << 20))
        _recv_exact(s, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        s.close()
    copied = tmp_path / "after.raw"
    run(["nbdcopy", srv.uri(), copied])
    assert copied.read_bytes() == bytes(disk.data)
    assert srv.alive()
    assert srv.stop() == 0


def test_tls_require(local_point, serve, tmp_path, tls_files):
    disk = local_point.disks[0]
    srv = serve(
        local_point.url,
        local_point.id,
        "--disk",
        disk.vdi,
        "--tls",
        "require",
        "--tls-cert",
        tls_files["cert"],
        "--tls-key",
        tls_files["key"],
        env=local_point.env,
    )
    assert srv.ready["uri"].startswith("nbds://")
    # in clear text: refused
    clear = subprocess.run(["nbdinfo", srv.uri()], capture_output=True, text=True, timeout=TIMEOUT)
    assert clear.returncode != 0
    uri = f"nbds://{srv.ready['listen']}/?tls-certificates={tls_files['client_dir']}"
    copied = tmp_path / "tls.raw"
    run(["nbdcopy", uri, copied])
    assert copied.read_bytes() == bytes(disk.data)


def test_several_disks_without_disk_name_the_exports(local_point, serve, tmp_path):
    srv = serve(local_point.url, local_point.id, env=local_point.env)
    assert srv.ready["default_export"] is None
    bad = subprocess.run(["nbdinfo", srv.uri()], capture_output=True, text=True, timeout=TIMEOUT)
    assert bad.returncode != 0
    assert "default export" in bad.stderr  # libnbd 1.14 does not print the server's message
    listed = run(["nbdinfo", "--list", "--json", srv.uri()]).stdout
    names = sorted(e["export-name"] for e in json.loads(listed)["exports"])
    assert names == sorted(d.vdi for d in local_point.disks)


def test_usage_errors(local_point, tmp_path):
    base = [sys.executable, "-m", "orchestrator.cli", "serve", local_point.url, local_point.id]
    for extra, text in [
        (["--disk", "nope"], "has no disk nope"),
        (["--listen", "nowhere"], "expected HOST:PORT"),
        (["--tls", "require"], "--tls-cert"),
    ]:
        proc = subprocess.run(
            base + extra,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=cli_env(local_point.env),
        )
        assert proc.returncode == 2, proc.stderr
        assert text in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    missing = subprocess.run(
        [*base[:-1], "nobody/20260101T000000.000000Z"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(local_point.env),
    )
    assert missing.returncode == 1
    assert "no restore point" in missing.stderr


def test_a_missing_chunk_fails_that_read_only(local_point, serve, tmp_path):
    """A chunk object gone from the repository: reads of it fail with EIO, the rest of the disk
    and the server go on."""
    import os

    from orchestrator.repo.codec import chunk_key
    from orchestrator.repo.repository import Repository

    disk = local_point.disks[0]
    with Repository.open(local_point.url) as repo:
        index = repo.read_index(local_point.keys[disk.vdi])
        os.unlink(os.path.join(local_point.url, chunk_key(index.get(9))))
    srv = serve(local_point.url, local_point.id, "--disk", disk.vdi, "--prefetch", "0")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    with pytest.raises(nbd.Error) as exc:
        h.pread(4096, 9 * CHUNK_SIZE)
    assert "Input/output error" in str(exc.value)  # EIO
    assert h.pread(4096, 10 * CHUNK_SIZE) == bytes(
        disk.data[10 * CHUNK_SIZE : 10 * CHUNK_SIZE + 4096]
    )
    h.shutdown()
    assert srv.alive()
