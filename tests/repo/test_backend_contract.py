"""The one backend contract, run against every backend (local directory, S3 on a moto server,
S3 through the fault-injecting proxy). A new backend is added to BACKENDS, never given its own
copy of these tests."""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest

from orchestrator.repo.backends import Backend, ObjectInfo, open_backend
from orchestrator.repo.errors import NotFound

BACKENDS = ["local", "s3", "s3-faulty"]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        b = open_backend(tmp_path / "repo")
    else:
        b = request.getfixturevalue(f"{request.param.replace('-', '_')}_backend")
    yield b
    b.close()


def keys_of(infos):
    return sorted(i.key for i in infos)


def test_get_missing_is_not_found(backend):
    with pytest.raises(NotFound, match="nothing/here"):
        backend.get("nothing/here")
    with pytest.raises(NotFound):
        backend.stat("nothing")
    assert not backend.exists("nothing")


def test_put_get_roundtrip_and_overwrite(backend):
    backend.put("a/b/c", b"first")
    assert backend.get("a/b/c") == b"first"
    backend.put("a/b/c", b"second, longer")
    assert backend.get("a/b/c") == b"second, longer"
    backend.put("empty", b"")
    assert backend.get("empty") == b""
    assert backend.stat("empty").size == 0


def test_binary_and_large_objects(backend):
    data = os.urandom(3 * 1024 * 1024 + 17)
    backend.put("chunks/ab/big", data)
    assert backend.get("chunks/ab/big") == data
    assert backend.stat("chunks/ab/big").size == len(data)


def test_put_if_absent(backend):
    assert backend.put_if_absent("locks/gc", b"mine") is True
    assert backend.put_if_absent("locks/gc", b"yours") is False
    assert backend.get("locks/gc") == b"mine"
    backend.delete("locks/gc")
    assert backend.put_if_absent("locks/gc", b"yours") is True
    assert backend.get("locks/gc") == b"yours"


def test_put_if_absent_races_have_one_winner(backend):
    def attempt(n):
        return backend.put_if_absent("locks/race", f"writer {n}".encode())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(16)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert backend.get("locks/race") == f"writer {winner}".encode()


def test_exists_and_stat(backend):
    before = time.time()
    backend.put("x/y", b"12345")
    assert backend.exists("x/y")
    assert not backend.exists("x")  # a "directory" is not an object
    info = backend.stat("x/y")
    assert info == ObjectInfo("x/y", 5, info.mtime)
    assert before - 5 <= info.mtime <= time.time() + 5


def test_list_recursive_relative_keys(backend):
    wanted = ["backups/vm1/a.json", "backups/vm1/d1/t1.index", "backups/vm2/t.json", "config"]
    for k in wanted:
        backend.put(k, k.encode())
    assert keys_of(backend.list()) == sorted(wanted)
    assert keys_of(backend.list("")) == sorted(wanted)
    assert keys_of(backend.list("backups/")) == sorted(wanted[:3])
    assert keys_of(backend.list("backups/vm1/")) == wanted[:2]
    assert keys_of(backend.list("backups/vm1")) == wanted[:2]  # plain prefix, not a directory
    assert keys_of(backend.list("backups/vm")) == sorted(wanted[:3])
    assert keys_of(backend.list("backups/vm1/d1/t1.index")) == [wanted[1]]
    assert keys_of(backend.list("nothing/")) == []
    assert keys_of(backend.list("conf")) == ["config"]
    sizes = {i.key: i.size for i in backend.list()}
    assert sizes == {k: len(k) for k in wanted}


def test_list_and_delete_many_pages(backend):
    # Small pages and batches so that paging (continuation tokens) and batching are exercised.
    if hasattr(backend, "list_page_size"):
        backend.list_page_size = 23
        backend.delete_batch_size = 31
    keys = [f"chunks/{i % 7:02x}/{i:064x}" for i in range(150)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: backend.put(k, b"x"), keys))
    assert keys_of(backend.list("chunks/")) == sorted(keys)
    backend.delete_many(keys)
    assert keys_of(backend.list("chunks/")) == []


def test_delete_is_idempotent(backend):
    backend.put("d/one", b"1")
    backend.delete("d/one")
    backend.delete("d/one")
    backend.delete("never/was")
    assert not backend.exists("d/one")
    with pytest.raises(NotFound):
        backend.get("d/one")


def test_delete_many(backend):
    for i in range(5):
        backend.put(f"m/{i}", b"x")
    backend.delete_many([f"m/{i}" for i in range(3)] + ["m/missing"])
    assert keys_of(backend.list("m/")) == ["m/3", "m/4"]
    backend.delete_many([])


@pytest.mark.parametrize("bad", ["", "/abs", "a//b", "a/../b", "./a", "a/", "x\\y", ".tmp-x"])
def test_invalid_keys_are_refused(backend, bad):
    with pytest.raises(ValueError):
        backend.put(bad, b"x")


def test_url_names_the_backend(backend):
    assert isinstance(backend.url, str) and backend.url
    assert backend.url in repr(backend)


def test_open_backend_accepts_s3_options_for_local_paths(tmp_path):
    from orchestrator.repo.retry import RetryPolicy

    b = open_backend(f"file://{tmp_path}/r", concurrency=4, retry=RetryPolicy(), read_timeout=5)
    b.put("k", b"v")
    assert (tmp_path / "r" / "k").read_bytes() == b"v"


def test_opening_a_local_path_creates_nothing_until_a_write(tmp_path):
    from orchestrator.repo.config import load_repo
    from orchestrator.repo.errors import RepoNotFound

    path = tmp_path / "typo" / "repo"
    b = open_backend(path)
    assert list(b.list()) == [] and not b.exists("config")
    with pytest.raises(RepoNotFound):
        load_repo(b)
    assert not (tmp_path / "typo").exists()
    b.put("config", b"x")
    assert (path / "config").read_bytes() == b"x"
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(Exception, match="not a directory"):
        open_backend(tmp_path / "file")


ODD_KEYS = [
    "backups/vm é/2026-11-27T08:00:00Z.index",
    "backups/a+b=c&d/x y.json",
    "backups/100%/~tilde",
    "backups/quote'\"/semi;colon",
]


def test_odd_characters_in_keys(backend):
    for i, key in enumerate(ODD_KEYS):
        backend.put(key, b"v%d" % i)
    assert keys_of(backend.list("backups/")) == sorted(ODD_KEYS)
    for i, key in enumerate(ODD_KEYS):
        assert backend.get(key) == b"v%d" % i
        assert backend.exists(key) and backend.stat(key).key == key
    assert keys_of(backend.list("backups/a+b")) == [ODD_KEYS[1]]
    backend.delete_many(ODD_KEYS[:2])
    backend.delete(ODD_KEYS[2])
    assert keys_of(backend.list()) == [ODD_KEYS[3]]


def test_concurrent_overwrites_are_never_mixed(backend):
    import hashlib

    def payload(n):
        body = bytes([n]) * (300_000 + n * 1000)
        return hashlib.sha256(body).digest() + body

    def check(data):
        return hashlib.sha256(data[32:]).digest() == data[:32]

    backend.put("hot", payload(0))

    def writer(n):
        backend.put("hot", payload(n))
        return True

    def reader(_):
        return check(backend.get("hot"))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(writer, n) for n in range(1, 9)] + [
            pool.submit(reader, i) for i in range(16)
        ]
        assert all(f.result() for f in futures)
    final = backend.get("hot")
    assert check(final) and final[32] in range(1, 9)


def test_local_put_if_absent_without_hard_links(tmp_path, monkeypatch):
    """Filesystems without hard links (some FUSE/SMB mounts): fall back to check-then-rename."""
    import errno

    from orchestrator.repo.backends import local as local_mod

    calls = []

    def no_link(src, dst):
        calls.append(dst)
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(local_mod.os, "link", no_link)
    b = open_backend(tmp_path / "r")
    assert b.put_if_absent("a/k", b"1") is True
    assert b.put_if_absent("a/k", b"2") is False
    assert b.put_if_absent("a/j", b"3") is True
    assert b.get("a/k") == b"1" and b.get("a/j") == b"3"
    assert len(calls) == 1  # remembered after the first refusal
    assert sorted(p.name for p in (tmp_path / "r" / "a").iterdir()) == ["j", "k"]  # no temp left


def test_local_new_directories_are_fsynced(tmp_path, monkeypatch):
    from orchestrator.repo.backends import local as local_mod

    synced = []
    real = local_mod._fsync_dir
    monkeypatch.setattr(local_mod, "_fsync_dir", lambda d: (synced.append(d), real(d)))
    b = open_backend(tmp_path / "r")
    b.put("x/y/z", b"1")
    root = str(tmp_path / "r")
    # each new directory's parent, then the object's directory after the rename
    assert synced == [str(tmp_path), root, f"{root}/x", f"{root}/x/y"]
    synced.clear()
    b.put("x/y/w", b"2")
    assert synced == [f"{root}/x/y"]
