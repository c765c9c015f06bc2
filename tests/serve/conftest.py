"""Fixtures of the ``fastpath serve`` tests: a restore point in a repository (local or S3,
encrypted or not) and a ``fastpath serve`` subprocess on an ephemeral port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import pytest

from orchestrator.repo.repository import Repository
from tests.fixtures.s3 import stop_process
from tests.repo_ops.helpers import DiskModel, backup

PASSPHRASE = "correct horse battery staple"
TIMEOUT = 120


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch):
    monkeypatch.setenv("FASTPATH_INSECURE_TEST_KDF_N", "1024")


def cli_env(extra: dict | None = None) -> dict[str, str]:
    env = {**os.environ, "FASTPATH_INSECURE_TEST_KDF_N": "1024"}
    env.update(extra or {})
    return env


def model_disk(seed: int = 3) -> DiskModel:
    """20 chunks + a 3-sector tail: data, holes, an all-zero written chunk, a partial tail."""
    disk = DiskModel(20, tail=3 * 512, seed=seed)
    for i in (0, 1, 2, 5, 9, 10, 11, 12, 17, 20):
        disk.write_chunk(i, seed=seed * 100 + i)
    disk.write_chunk(14, content=bytes(2 << 20))  # written, but zero: must stay a hole
    return disk


@dataclass
class Point:
    url: str
    id: str
    disks: list[DiskModel]
    keys: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)


def make_point(url: str, encrypted: bool = False, env: dict | None = None) -> Point:
    """A repository at ``url`` with one restore point of two disks (``model_disk``)."""
    env = dict(env or {})
    if encrypted:
        env["FASTPATH_PASSPHRASE"] = PASSPHRASE
    repo = Repository.init(url, encrypt=encrypted, passphrase=PASSPHRASE if encrypted else None)
    disks = [model_disk(3), model_disk(4)]
    try:
        rid, keys = backup(repo, "0e3f3f5e-1111-4222-8333-444455556666", disks)
    finally:
        repo.close()
    return Point(url, rid, disks, keys, env)


@pytest.fixture(params=["local", "local-encrypted", "s3", "s3-encrypted"])
def point(request, tmp_path):
    """The same restore point on a local directory and on moto S3, encrypted and not."""
    where, _, enc = request.param.partition("-")
    if where == "local":
        return make_point(str(tmp_path / "repo"), bool(enc))
    s3 = request.getfixturevalue("s3_env")
    return make_point(s3.url, bool(enc), s3.env)


@pytest.fixture
def local_point(tmp_path):
    """The restore point on a plain local repository (tests of one behaviour, not of storage)."""
    return make_point(str(tmp_path / "repo"))


class ServeProc:
    """``fastpath serve ... --listen 127.0.0.1:0 --json`` running; ``.ready`` is its JSON."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "serve",
                *args,
                "--json",
                "--listen",
                "127.0.0.1:0",
                "--progress",
                "lines",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(env),
            text=True,
        )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))
        reader.daemon = True
        reader.start()
        reader.join(TIMEOUT)
        if not line or not line[0].strip():
            self.stop()
            raise RuntimeError(f"fastpath serve did not start: {self.proc.stderr.read()[-3000:]}")
        self.ready = json.loads(line[0])

    def uri(self, name: str = "") -> str:
        return f"nbd://{self.ready['listen']}/{name}"

    @property
    def port(self) -> int:
        return int(self.ready["listen"].rpartition(":")[2])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        return self.proc.returncode


@pytest.fixture
def serve():
    procs: list[ServeProc] = []

    def start(*args, env=None):
        p = ServeProc([str(a) for a in args], env or {})
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
