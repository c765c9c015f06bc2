"""Helpers for the repository-operations tests: a call-counting backend wrapper, disk models."""

from __future__ import annotations

import collections
import random
import threading
import time
import uuid
from collections.abc import Iterable, Iterator

from orchestrator.repo.backends.base import Backend, ObjectInfo
from orchestrator.repo.codec import CHUNK_SIZE

VERBS = ("get", "put", "put_if_absent", "exists", "stat", "list", "delete", "delete_many", "copy")


class CountingBackend(Backend):
    """Wraps a backend and counts calls by verb and by key family ("chunks", "backups", ...).

    ``copy`` is counted as a verb although the contract has no copy: any attribute access to a
    copy-like method is counted too, so a test asserting zero copies would see one.
    """

    def __init__(self, inner: Backend):
        self.inner = inner
        self.url = inner.url
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.before: dict[str, object] = {}  # verb -> callable(key) run before the call

    def _count(self, verb: str, key: str) -> None:
        family = key.split("/", 1)[0] if key else ""
        with self.lock:
            self.calls[(verb, family)] += 1
            self.log.append((verb, key))
        hook = self.before.get(verb)
        if hook is not None:
            hook(key)

    def count(self, verb: str, family: str | None = None) -> int:
        with self.lock:
            return sum(n for (v, f), n in self.calls.items() if v == verb and family in (None, f))

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.log.clear()

    def get(self, key: str) -> bytes:
        self._count("get", key)
        return self.inner.get(key)

    def put(self, key: str, data: bytes) -> None:
        self._count("put", key)
        self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self._count("put_if_absent", key)
        return self.inner.put_if_absent(key, data)

    def exists(self, key: str) -> bool:
        self._count("exists", key)
        return self.inner.exists(key)

    def stat(self, key: str) -> ObjectInfo:
        self._count("stat", key)
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count("list", prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._count("delete", key)
        self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for key in keys:
            self._count("delete_many", key)
        self.inner.delete_many(keys)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        if "copy" in name:
            self._count("copy", name)
        return getattr(self.inner, name)


def chunk_bytes(seed: int, length: int = CHUNK_SIZE) -> bytes:
    """Deterministic chunk content: half text-like (compressible), half random."""
    rng = random.Random(seed)
    half = length // 2
    word = b"fastpath %d " % seed
    text = word * (half // len(word) + 1)
    return text[:half] + rng.randbytes(length - half)


class DiskModel:
    """A virtual disk as a bytearray, with the chunks it changed since the last backup."""

    def __init__(self, chunks: int, tail: int = 0, seed: int = 0):
        self.vdi = str(uuid.UUID(int=random.Random(seed).getrandbits(128)))
        self.size = chunks * CHUNK_SIZE + tail
        self.data = bytearray(self.size)
        self.count = chunks + (1 if tail else 0)
        self.changed: set[int] = set()

    def length(self, i: int) -> int:
        return min(CHUNK_SIZE, self.size - i * CHUNK_SIZE)

    def write_chunk(self, i: int, content: bytes | None = None, seed: int = 0) -> None:
        n = self.length(i)
        self.data[i * CHUNK_SIZE : i * CHUNK_SIZE + n] = (content or chunk_bytes(seed, n))[:n]
        self.changed.add(i)

    def chunk(self, i: int) -> bytes:
        return bytes(self.data[i * CHUNK_SIZE : i * CHUNK_SIZE + self.length(i)])


def backup(
    repo,
    vm: str,
    disks: list[DiskModel],
    bases: dict[str, str] | None = None,
    pause: float = 0.0,
    **kw,
):
    """Back up ``disks`` of ``vm``: full (every non-zero chunk) or incremental (changed chunks
    on top of ``bases[vdi]``). Returns (restore point id, {vdi: index key}). ``pause``: sleep
    before each commit (widens race windows in the race tests)."""
    keys = {}
    with repo.begin_backup(vm, **kw) as session:
        for disk in disks:
            base = (bases or {}).get(disk.vdi)
            w = session.disk_writer(disk.vdi, disk.vdi, disk.size, base=base)
            todo = sorted(disk.changed) if base else range(disk.count)
            for i in todo:
                chunk = disk.chunk(i)
                if base is None and not any(chunk):
                    continue  # a hole: never put, stays zero
                w.put_chunk(i, chunk)
            if pause:
                w.wait()
                time.sleep(pause)
            keys[disk.vdi] = commit_with_retry(w, disk)
            disk.changed.clear()
        rid = session.commit({"test": True})
    return rid, keys


VANISHED = collections.Counter()  # how often commit_with_retry had to re-put (race tests)


def commit_with_retry(writer, disk: DiskModel, attempts: int = 5) -> str:
    """What the backup job does on ChunksVanished: put those chunks again, commit again."""
    from orchestrator.repo.writer import ChunksVanished

    for _ in range(attempts):
        try:
            return writer.commit()
        except ChunksVanished as exc:
            VANISHED["commits"] += 1
            VANISHED["chunks"] += len(exc.positions)
            for i in exc.positions:
                writer.put_chunk(i, disk.chunk(i))
    return writer.commit()


def restore(repo, key: str) -> bytes:
    return b"".join(repo.iter_disk(repo.read_index(key)))
