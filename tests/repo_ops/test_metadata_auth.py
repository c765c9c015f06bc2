"""Indexes and restore point documents of an encrypted repository are authenticated with the
repository key and bound to where they are stored (issue 14, finding 2). Each attack edits the
stored objects as someone with write access to the repository but not the passphrase would,
recomputing every checksum that needs no key."""

from __future__ import annotations

import json
import uuid

import blake3
import pytest

from orchestrator.jobs.verify import run_check, run_verify
from orchestrator.repo.backends import open_backend
from orchestrator.repo.catalog import rp_key
from orchestrator.repo.errors import IndexTampered, Tampered
from orchestrator.repo.index import Index
from orchestrator.repo.repository import Repository
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import DiskModel, backup
from tests.repo_ops.test_cli import as_json, fastpath, one_line_error

VM_A = str(uuid.UUID(int=0xA1))
VM_B = str(uuid.UUID(int=0xB2))


class _Unkeyed:
    """What an attacker without the key can compute: plain BLAKE3 in place of the keyed MACs."""

    def body(self, entries):
        return blake3.blake3(entries).digest()

    def header(self, header):
        return blake3.blake3(header).digest()


def forge(index: Index, version: int = 2) -> bytes:
    """``index`` encoded as a version ``version`` index with unkeyed checksums."""
    return index.encode() if version == 1 else index.encode(_Unkeyed())


def unverified(data: bytes) -> Index:
    from orchestrator.repo.index import UNVERIFIED

    return Index.decode(data, "attacker", UNVERIFIED)


@pytest.fixture(params=["local", "s3"])
def world(request, tmp_path):
    """An encrypted repository: VM A with two restore points of one disk, VM B with two disks."""
    url = (
        str(tmp_path / "enc") if request.param == "local" else request.getfixturevalue("s3_env").url
    )
    repo = Repository.init(url, encrypt=True, passphrase=PASSPHRASE)
    a = DiskModel(chunks=2, seed=1)
    a.write_chunk(0, seed=10)
    a.write_chunk(1, seed=11)
    a1, ka1 = backup(repo, VM_A, [a])
    a.write_chunk(1, seed=12)
    a2, ka2 = backup(repo, VM_A, [a], bases=ka1)
    b1, b2 = DiskModel(chunks=2, seed=2), DiskModel(chunks=2, seed=3)
    b1.write_chunk(0, seed=20)
    b2.write_chunk(0, seed=30)
    b, kb = backup(repo, VM_B, [b1, b2])
    repo.close()
    w = {
        "url": url,
        "a1": a1, "a2": a2, "b": b,
        "ka1": ka1[a.vdi], "ka2": ka2[a.vdi], "kb1": kb[b1.vdi], "kb2": kb[b2.vdi],
        "a_data": bytes(a.data),
    }  # fmt: skip
    backend = open_backend(url)
    yield backend, w
    backend.close()


def _open(backend):
    return Repository.open(backend, passphrase=PASSPHRASE)


def _assert_detected(backend, w, index_key, point_id):
    """verify reports the index as damaged and the point as affected; restore refuses it."""
    repo = _open(backend)
    report = run_verify(repo)
    assert not report["ok"]
    assert [d["index"] for d in report["damaged_indexes"]] == [index_key]
    assert "authentic" in report["damaged_indexes"][0]["error"]
    assert point_id in report["affected_restore_points"]
    (point,) = [p for p in repo.list_restore_points() if p.id == point_id]
    doc = repo.read_metadata(point)
    vdi = index_key.split("/")[2]
    with pytest.raises(IndexTampered):
        repo.read_point_index(point, doc, vdi)
    repo.close()


def test_clean_world_verifies(world):
    backend, w = world
    repo = _open(backend)
    assert run_verify(repo)["ok"] and run_check(repo)["ok"]
    (point,) = [p for p in repo.list_restore_points() if p.id == w["a2"]]
    index = repo.read_point_index(point, repo.read_metadata(point), w["ka2"].split("/")[2])
    assert b"".join(repo.iter_disk(index)) == w["a_data"]
    repo.close()


def test_spliced_entry_is_detected_by_verify_and_refused_by_restore(world, tmp_path):
    """The reported attack: vmA's index entry 0 pointed at vmB's chunk (checksums recomputed)
    used to pass `verify` (0 damaged) and `restore vmA/latest` returned vmB's data."""
    backend, w = world
    a = unverified(backend.get(w["ka2"]))
    b = unverified(backend.get(w["kb1"]))
    a.set(0, b.get(0))
    backend.put(w["ka2"], forge(a))
    _assert_detected(backend, w, w["ka2"], w["a2"])
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    v = fastpath("verify", w["url"], "--json", env=env)
    assert v.returncode == 1 and as_json(v)["damaged_indexes"][0]["index"] == w["ka2"]
    out = tmp_path / "out.raw"
    r = fastpath("restore", w["url"], f"{VM_A}/latest", "-o", out, "--json", env=env)
    assert r.returncode == 1 and as_json(r)["exception"] == "IndexTampered"
    assert "authentication failed" in one_line_error(r) and not out.exists()


def test_version_1_index_in_an_encrypted_repository_is_refused(world):
    backend, w = world
    a = unverified(backend.get(w["ka2"]))
    backend.put(w["ka2"], forge(a, version=1))
    _assert_detected(backend, w, w["ka2"], w["a2"])


def test_index_swapped_between_vms_is_detected(world):
    backend, w = world
    backend.put(w["ka2"], backend.get(w["kb1"]))  # a valid index, of vmB's disk
    _assert_detected(backend, w, w["ka2"], w["a2"])


def test_index_swapped_between_disks_of_a_vm_is_detected(world):
    backend, w = world
    backend.put(w["kb2"], backend.get(w["kb1"]))
    _assert_detected(backend, w, w["kb2"], w["b"])


def test_older_index_replayed_under_a_newer_point_is_detected(world):
    backend, w = world
    backend.put(w["ka2"], backend.get(w["ka1"]))  # vmA's disk as it was at the first point
    _assert_detected(backend, w, w["ka2"], w["a2"])


def _assert_point_refused(backend, w, point_id, match):
    repo = _open(backend)
    report = run_verify(repo)
    assert not report["ok"]
    assert [d["restore_point"] for d in report["damaged_restore_points"]] == [point_id]
    assert point_id in report["affected_restore_points"]
    (point,) = [p for p in repo.list_restore_points() if p.id == point_id]
    with pytest.raises(Tampered, match=match):
        doc = repo.read_metadata(point)
        repo.point_disks(point, doc)
    repo.close()


def test_older_restore_point_document_replayed_is_refused(world):
    backend, w = world
    t1, t2 = w["a1"].split("/")[1], w["a2"].split("/")[1]
    backend.put(rp_key(VM_A, t2), backend.get(rp_key(VM_A, t1)))
    _assert_point_refused(backend, w, w["a2"], "authentication failed")


def test_restore_point_document_moved_between_vms_is_refused(world):
    backend, w = world
    tb = w["b"].split("/")[1]
    backend.put(rp_key(VM_A, tb), backend.get(rp_key(VM_B, tb)))  # vmB's doc as a point of vmA
    backend.put(w["ka2"].rsplit("/", 1)[0] + f"/{tb}.index", backend.get(w["ka2"]))
    repo = _open(backend)
    (point,) = [p for p in repo.list_restore_points(VM_A) if p.time == tb]
    with pytest.raises(Tampered, match="authentication failed"):
        repo.read_metadata(point)
    assert not run_verify(repo)["ok"]
    repo.close()


def test_edited_or_unsealed_restore_point_document_is_refused(world):
    backend, w = world
    t2 = w["a2"].split("/")[1]
    envelope = json.loads(backend.get(rp_key(VM_A, t2)))
    sealed = bytearray(envelope["sealed"].encode())
    sealed[40] = ord("A") if sealed[40] != ord("A") else ord("B")
    envelope["sealed"] = sealed.decode()
    backend.put(rp_key(VM_A, t2), json.dumps(envelope).encode())
    _assert_point_refused(backend, w, w["a2"], "authentication failed")
    plain = {"format": "xcp-fastpath-restore-point", "version": 1, "id": w["a2"], "vm": VM_A,
             "time": t2, "disks": [], "metadata": {"vm": {"name_label": "evil"}}}  # fmt: skip
    backend.put(rp_key(VM_A, t2), json.dumps(plain).encode())
    _assert_point_refused(backend, w, w["a2"], "unauthenticated")


def test_removed_disk_index_is_detected(world, tmp_path):
    backend, w = world
    backend.delete(w["kb2"])
    _assert_point_refused(backend, w, w["b"], "index was removed or added")
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    r = fastpath("restore", w["url"], w["b"], "-o", tmp_path, "--json", env=env)
    assert r.returncode == 1 and as_json(r)["exception"] == "Tampered"


def test_restore_point_documents_are_encrypted(tmp_path):
    """Finding 3: the VM record (name, platform, xenstore data, disks) is not readable from the
    stored object; only the passphrase opens it."""
    url = tmp_path / "enc"
    repo = Repository.init(url, encrypt=True, passphrase=PASSPHRASE)
    disk = DiskModel(chunks=1, seed=5)
    disk.write_chunk(0, seed=50)
    secret = {"vm": {"name_label": "payroll-db", "xenstore_data": {"vm-data/secret": "s3cr3t"},
                     "platform": {"secure-boot": "true"}}}  # fmt: skip
    with repo.begin_backup(VM_A) as session:
        w = session.disk_writer(disk.vdi, disk.vdi, disk.size)
        w.put_chunk(0, disk.chunk(0))
        w.commit()
        rid = session.commit(secret)
    repo.close()
    stored = (url / "backups" / f"{rid}.json").read_bytes()
    for word in (b"payroll-db", b"s3cr3t", b"secure-boot", disk.vdi.encode(), b"name_label"):
        assert word not in stored
    assert json.loads(stored)["format"] == "xcp-fastpath-sealed-restore-point"
    repo = Repository.open(url, passphrase=PASSPHRASE)
    (point,) = repo.list_restore_points()
    assert repo.read_metadata(point)["metadata"] == secret
    repo.close()
    keyless = Repository.open(url, need_key=False)
    with pytest.raises(Exception, match="needs its passphrase"):
        keyless.read_metadata(point)
    assert run_check(keyless)["ok"]  # structure checks still run without the key
    keyless.close()
    r = fastpath("list", url)
    assert r.returncode == 1 and "list needs its passphrase" in one_line_error(r)
    r = fastpath("list", url, "--json", env={"FASTPATH_PASSPHRASE": PASSPHRASE})
    assert as_json(r)["restore_points"][0]["vm_name"] == "payroll-db"


def test_gc_with_the_key_stops_on_a_tampered_index(world):
    """A spliced index names chunks GC cannot trust: with the key, GC refuses to sweep."""
    from orchestrator.jobs.gc import GcRefused, run_gc

    backend, w = world
    a = unverified(backend.get(w["ka2"]))
    a.set(1, bytes(32))  # "this chunk is zero now": its real chunk would become garbage
    backend.put(w["ka2"], forge(a))
    before = sorted(i.key for i in backend.list("chunks/"))
    repo = _open(backend)
    with pytest.raises(GcRefused, match="damaged index"):
        run_gc(repo, margin=0)
    repo.close()
    assert sorted(i.key for i in backend.list("chunks/")) == before
