"""``fastpath list`` (VM name, time, full/incremental, logical and stored size, --vm, --json)
and ``fastpath restore -o`` refusing to overwrite without --force / naming a missing directory."""

from __future__ import annotations

from orchestrator.repo.codec import CHUNK_SIZE
from orchestrator.repo.repository import Repository
from tests.repo_ops.helpers import DiskModel, backup
from tests.repo_ops.test_cli import as_json, fastpath

VM_A = "aaaaaaaa-0000-4000-8000-000000000001"
VM_B = "bbbbbbbb-0000-4000-8000-000000000002"


def _repo_with_points(tmp_path):
    url = str(tmp_path / "repo")
    repo = Repository.init(url)
    disk = DiskModel(6, seed=1)
    for i in range(4):
        disk.write_chunk(i, seed=10 + i)
    full, keys = backup(repo, VM_A, [disk])
    disk.at_full = bytes(disk.data)
    disk.write_chunk(5, seed=99)
    with repo.begin_backup(VM_A) as session:  # an incremental with a VM record
        w = session.disk_writer(disk.vdi, disk.vdi, disk.size, base=keys[disk.vdi])
        w.put_chunk(5, disk.chunk(5))
        w.commit()
        incr = session.commit({"vm": {"name_label": "web server", "uuid": VM_A}})
    other, _ = backup(repo, VM_B, [DiskModel(2, seed=2)])
    repo.close()
    return url, disk, full, incr, other


def test_list_shows_name_kind_and_sizes(tmp_path):
    url, disk, full, incr, other = _repo_with_points(tmp_path)
    rows = {r["id"]: r for r in as_json(fastpath("list", url, "--json"))["restore_points"]}
    assert set(rows) == {full, incr, other}
    assert rows[full]["kind"] == "full" and rows[incr]["kind"] == "incremental"
    assert rows[incr]["vm_name"] == "web server" and rows[full]["vm_name"] is None
    assert rows[full]["logical_size"] == rows[incr]["logical_size"] == disk.size
    assert rows[full]["data_bytes"] == 4 * CHUNK_SIZE
    assert rows[incr]["data_bytes"] == CHUNK_SIZE
    assert 0 < rows[incr]["stored_bytes"] < rows[full]["stored_bytes"]
    only_b = as_json(fastpath("list", url, "--vm", VM_B, "--json"))["restore_points"]
    assert [r["id"] for r in only_b] == [other]
    text = fastpath("list", url).stdout
    assert "web server" in text and "incremental" in text and "12.0 MiB" in text


def test_restore_output_refuses_overwrite_and_names_missing_dir(tmp_path):
    url, disk, full, _, _ = _repo_with_points(tmp_path)
    out = tmp_path / "disk.raw"
    out.write_bytes(b"precious")
    r = fastpath("restore", url, full, "-o", out)
    assert r.returncode == 1
    assert "exists: give --force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious"
    r = fastpath("restore", url, full, "-o", out, "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == disk.at_full
    missing = tmp_path / "no" / "such" / "disk.raw"
    r = fastpath("restore", url, full, "-o", missing)
    assert r.returncode == 1
    assert f"directory {missing.parent} does not exist" in r.stderr
