"""verify / check / stats: damage is found, named, and mapped to the restore points it hurts."""

from __future__ import annotations

import uuid

import pytest

from orchestrator.jobs.verify import repository_stats, run_check, run_verify
from orchestrator.repo.codec import CHUNK_SIZE, chunk_key
from orchestrator.repo.index import Index
from orchestrator.repo.repository import Repository
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import DiskModel, backup

VM_A = str(uuid.UUID(int=0xA))
VM_B = str(uuid.UUID(int=0xB))


def populate(repo):
    """Two VMs sharing one chunk; VM A has two restore points."""
    a = DiskModel(chunks=2, tail=4096, seed=1)
    a.write_chunk(0, seed=7)  # shared with B
    a.write_chunk(1, seed=11)
    a.write_chunk(2, seed=12)
    rid_a1, ka1 = backup(repo, VM_A, [a])
    a.write_chunk(1, seed=13)
    rid_a2, ka2 = backup(repo, VM_A, [a], bases=ka1)
    b = DiskModel(chunks=1, seed=2)
    b.write_chunk(0, seed=7)
    rid_b, kb = backup(repo, VM_B, [b])
    shared = repo.codec.digest(a.chunk(0))
    only_a1 = repo.codec.digest(_chunk(11))
    return {"a1": rid_a1, "a2": rid_a2, "b": rid_b, "shared": shared, "only_a1": only_a1}


def _chunk(seed):
    from tests.repo_ops.helpers import chunk_bytes

    return chunk_bytes(seed, CHUNK_SIZE)


def flip(backend, key, offset=-1):
    data = bytearray(backend.get(key))
    data[offset] ^= 0x01
    backend.put(key, bytes(data))


@pytest.mark.parametrize("encrypted", [False, True])
def test_verify_finds_a_flipped_byte_and_names_the_restore_points(tmp_path, encrypted):
    repo = Repository.init(
        tmp_path / "r", encrypt=encrypted, passphrase=PASSPHRASE if encrypted else None
    )
    ids = populate(repo)
    clean = run_verify(repo)
    assert clean["ok"] and clean["chunks_checked"] == clean["chunks_referenced"] == 4
    flip(repo.backend, chunk_key(ids["shared"]), offset=-5)
    report = run_verify(repo)
    assert not report["ok"]
    (bad,) = report["damaged_chunks"]
    assert bad["digest"] == ids["shared"].hex()
    assert ("authentication failed" if encrypted else "digest mismatch") in bad["error"] or (
        "zstd" in bad["error"]
    )
    assert sorted(report["affected_restore_points"]) == sorted([ids["a1"], ids["a2"], ids["b"]])


def test_verify_reports_a_chunk_only_one_point_needs(repo):
    ids = populate(repo)
    flip(repo.backend, chunk_key(ids["only_a1"]), offset=20)
    report = run_verify(repo)
    assert list(report["affected_restore_points"]) == [ids["a1"]]


def test_missing_chunk_found_by_verify_and_check(repo):
    ids = populate(repo)
    repo.backend.delete(chunk_key(ids["only_a1"]))
    report = run_verify(repo)
    assert report["damaged_chunks"][0]["error"] == "missing"
    check = run_check(repo)
    assert not check["ok"] and check["missing_chunks"] == [ids["only_a1"].hex()]
    assert list(check["affected_restore_points"]) == [ids["a1"]]


def test_damaged_index_is_reported_not_half_trusted(repo):
    ids = populate(repo)
    point = repo.resolve(ids["a2"])
    (key,) = point.disks.values()
    flip(repo.backend, key, offset=-40)  # an entry in the body: the body checksum fails
    report = run_verify(repo)
    assert not report["ok"]
    (bad,) = report["damaged_indexes"]
    assert bad["index"] == key and bad["restore_point"] == ids["a2"]
    assert "checksum" in bad["error"]
    assert ids["a2"] in report["affected_restore_points"]
    # nothing of the damaged index was used: the chunk only it referenced is not checked
    assert report["chunks_checked"] == 3
    assert not run_check(repo)["ok"]


def test_truncated_index_and_bad_json(repo):
    ids = populate(repo)
    point = repo.resolve(ids["b"])
    (key,) = point.disks.values()
    repo.backend.put(key, repo.backend.get(key)[:100])
    repo.backend.put(repo.resolve(ids["a1"]).json_key, b"{not json")
    report = run_check(repo)
    assert {d["restore_point"] for d in report["damaged_indexes"]} == {ids["b"]}
    assert {d["restore_point"] for d in report["damaged_restore_points"]} == {ids["a1"]}


def test_sample_checks_a_subset(repo):
    populate(repo)
    report = run_verify(repo, sample=40, seed=1)
    assert report["ok"] and report["chunks_checked"] == 2
    with pytest.raises(ValueError):
        run_verify(repo, sample=0)


def test_stats_counts_logical_unique_and_stored_bytes(repo):
    populate(repo)
    s = repository_stats(repo)
    # logical: A1 = 2 chunks + 4 KiB tail, A2 the same, B = 1 chunk
    assert s["logical_bytes"] == 2 * (2 * CHUNK_SIZE + 4096) + CHUNK_SIZE
    # unique: shared chunk, A's two versions of chunk 1, A's tail
    assert s["unique_bytes"] == 3 * CHUNK_SIZE + 4096
    assert s["chunks"] == s["chunks_referenced"] == 4
    assert s["dedup_ratio"] == round(s["logical_bytes"] / s["unique_bytes"], 3)
    assert s["compression_ratio"] > 1.5  # half of each chunk is repetitive text
    assert s["restore_points"] == 3 and s["vms"] == 2
    idx = Index.decode(repo.backend.get(repo.scan().indexes[0]))
    assert idx.chunk_size == CHUNK_SIZE
