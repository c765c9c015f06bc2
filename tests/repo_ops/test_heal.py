"""Healing: re-read once before calling a chunk damaged, verify --mark, re-backup heals, repair."""

from __future__ import annotations

import http.client
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from orchestrator.jobs.copy import copy_repository
from orchestrator.jobs.repair import run_repair
from orchestrator.jobs.verify import run_verify
from orchestrator.repo.backends import open_backend
from orchestrator.repo.codec import chunk_key
from orchestrator.repo.damage import damage_key, damaged_digests
from orchestrator.repo.errors import CorruptChunk
from orchestrator.repo.repository import Repository
from tests.fixtures.s3 import fast_retry
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import DiskModel, backup, restore

VM = str(uuid.UUID(int=0xC))


def flip(backend, key, offset=-5):
    data = bytearray(backend.get(key))
    data[offset] ^= 0x01
    backend.put(key, bytes(data))


def two_points(repo):
    disk = DiskModel(chunks=3, seed=3)
    for i in range(3):
        disk.write_chunk(i, seed=30 + i)
    old_id, old = backup(repo, VM, [disk])
    disk.write_chunk(2, seed=99)
    new_id, new = backup(repo, VM, [disk], bases=old)
    shared = repo.read_index(old[disk.vdi]).get(0)  # in both points
    return disk, old[disk.vdi], new[disk.vdi], shared


@pytest.mark.parametrize("encrypted", [False, True])
def test_flipped_byte_marked_then_a_backup_heals_every_point(tmp_path, encrypted):
    repo = Repository.init(
        tmp_path / "r", encrypt=encrypted, passphrase=PASSPHRASE if encrypted else None
    )
    disk, old_key, new_key, shared = two_points(repo)
    old_bytes = restore(repo, old_key)
    flip(repo.backend, chunk_key(shared))
    with pytest.raises(CorruptChunk):
        restore(repo, old_key)
    report = run_verify(repo, mark=True)
    assert not report["ok"] and report["marked"] == 1
    assert damaged_digests(repo.backend) == {shared}
    with repo.begin_backup(VM) as session:  # an incremental is told which base entries to put
        w = session.disk_writer(disk.vdi, disk.vdi, disk.size, base=new_key)
        assert w.damaged_positions == [0]
    # a fresh full backup of the same data stores the chunk again instead of deduplicating
    full = DiskModel(chunks=3, seed=3)
    full.data[:] = disk.data
    full.changed = set(range(3))
    with repo.begin_backup(VM) as session:
        w = session.disk_writer(full.vdi, full.vdi, full.size)
        for i in range(3):
            w.put_chunk(i, full.chunk(i))
        w.commit()
        session.commit({})
        stats = session.stats()
    assert stats.chunks_new == 1 and stats.bytes_written > 0
    assert damaged_digests(repo.backend) == set()  # the mark is cleared
    assert restore(repo, old_key) == old_bytes  # the OLD point is correct again
    assert run_verify(repo)["ok"]


def test_verify_mark_clears_marks_of_sound_chunks(tmp_path):
    repo = Repository.init(tmp_path / "r")
    _disk, _old, _new, shared = two_points(repo)
    repo.backend.put(damage_key(shared), b"{}")
    report = run_verify(repo, mark=True)
    assert report["ok"] and report["marks_cleared"] == 1
    assert not repo.backend.exists(damage_key(shared))


class CorruptingProxy:
    """HTTP forwarder to moto that flips one byte of the body of the next ``n`` GETs of a path
    containing ``needle`` (checksum headers dropped, as a faulty middlebox would not fix them)."""

    def __init__(self, upstream: str):
        up = urlparse(upstream)
        self.needle, self.left, self.corrupted = None, 0, 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{up.hostname}:{up.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with owner.lock:
                    hit = (
                        self.command == "GET"
                        and owner.needle is not None
                        and owner.needle in self.path
                        and owner.left > 0
                        and resp.status == 200
                        and data
                    )
                    if hit:
                        owner.left -= 1
                        owner.corrupted += 1
                if hit:
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x10
                    data = bytes(data)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-length", "transfer-encoding", "connection"):
                        continue
                    if k.lower().startswith("x-amz-checksum") or k.lower() == "content-md5":
                        continue
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def corrupt_next(self, needle: str, n: int = 1) -> None:
        with self.lock:
            self.needle, self.left = needle, n

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_one_corrupted_get_is_read_again_not_damage(s3_env):
    proxy = CorruptingProxy(s3_env.endpoint)
    try:
        backend = open_backend(s3_env.url, endpoint_url=proxy.url, retry=fast_retry())
        repo = Repository.init(backend)
        _disk, old_key, _new, shared = two_points(repo)
        expected = restore(repo, old_key)
        proxy.corrupt_next(shared.hex(), 1)
        assert restore(repo, old_key) == expected
        assert proxy.corrupted == 1
        proxy.corrupt_next(shared.hex(), 1)
        report = run_verify(repo, mark=True)
        assert proxy.corrupted == 2 and report["ok"] and report["marked"] == 0
        proxy.corrupt_next(shared.hex(), 2)  # damaged twice in a row: that is reported
        with pytest.raises(CorruptChunk):
            repo.read_chunk(shared)
        assert proxy.corrupted == 4
        backend.close()
    finally:
        proxy.close()


@pytest.mark.parametrize("other_keys", ["same", "plain"])
def test_repair_from_a_copy(tmp_path, other_keys):
    repo = Repository.init(tmp_path / "r")
    _disk, old_key, new_key, shared = two_points(repo)
    good_old, good_new = restore(repo, old_key), restore(repo, new_key)
    if other_keys == "same":
        other = Repository.init(tmp_path / "copy")
    else:
        other = Repository.init(tmp_path / "copy", encrypt=True, passphrase=PASSPHRASE)
    copy_repository(repo, other)
    flip(repo.backend, chunk_key(shared))
    assert run_verify(repo, mark=True)["marked"] == 1
    nothing = run_repair(repo)
    assert not nothing["ok"] and nothing["damaged"] == [shared.hex()]
    result = run_repair(repo, other)
    assert result["ok"] and result["healed"] == [shared.hex()]
    assert restore(repo, old_key) == good_old and restore(repo, new_key) == good_new
    assert run_verify(repo)["ok"] and not damaged_digests(repo.backend)


def test_cli_verify_mark_repair_and_copy_usage(tmp_path):
    import json
    import subprocess
    import sys

    repo = Repository.init(tmp_path / "r")
    _disk, _old, _new, shared = two_points(repo)
    Repository.init(tmp_path / "c")

    def cli(*args):
        p = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True
        )
        return p.returncode, p.stdout, p.stderr

    rc, out, _ = cli("copy", str(tmp_path / "r"), str(tmp_path / "c"), "--json")
    assert rc == 0 and json.loads(out)["points_copied"] == 2
    flip(repo.backend, chunk_key(shared))
    rc, out, _ = cli("verify", str(tmp_path / "r"), "--mark", "--json")
    assert rc == 1 and json.loads(out)["marked"] == 1
    rc, _out, err = cli("repair", str(tmp_path / "r"))
    assert rc == 1 and err.strip().splitlines()[-1].startswith("fastpath repair: 1 chunk(s)")
    rc, out, _ = cli("repair", str(tmp_path / "r"), "--from", str(tmp_path / "c"), "--json")
    assert rc == 0 and json.loads(out)["healed"] == [shared.hex()]
    rc, _out, err = cli("copy", str(tmp_path / "r"), str(tmp_path / "c"), "--since", "soon")
    assert rc == 2 and "--since" in err
