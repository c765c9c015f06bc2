"""The pipeline's own rules, on real sources and a real repository: chunks a concurrent GC
deleted are read again from the source before the index commits; one failing disk cancels the
others and the real error (not the cancellation) is reported."""

import threading

import pytest

from orchestrator.jobs.pipeline import Cancelled, copy_disk, copy_disks
from orchestrator.repo.repository import Repository
from orchestrator.repo.writer import ChunksVanished, DiskWriter
from orchestrator.sources.base import SourceError
from orchestrator.sources.vhd_file import VhdFileSource
from tests.e2e.conftest import qemu_raw

MiB = 1 << 20


def make_vhd(path, writes, size=10 * MiB):
    import subprocess

    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(path), str(size)],
        check=True,
    )
    cmd = ["qemu-io", "-f", "vpc"]
    for off, n, byte in writes:
        cmd += ["-c", f"write -P {byte} {off} {n}"]
    subprocess.run([*cmd, str(path)], check=True, capture_output=True)
    return path


def test_vanished_chunks_are_read_again(tmp_path, monkeypatch):
    vhd = make_vhd(tmp_path / "d.vhd", [(0, 6 * MiB, 0x31)])
    repo = Repository.init(str(tmp_path / "repo"))
    orig_commit = DiskWriter.commit
    orig_put = DiskWriter.put_chunk
    puts = []
    raised = []

    def put(self, i, data):
        puts.append(i)
        return orig_put(self, i, data)

    def commit(self):
        if not raised:
            raised.append(True)
            self.wait()
            raise ChunksVanished("gc took them", [0, 2])
        return orig_commit(self)

    monkeypatch.setattr(DiskWriter, "put_chunk", put)
    monkeypatch.setattr(DiskWriter, "commit", commit)
    src = VhdFileSource(str(vhd))
    with src, repo.begin_backup("vm") as session:
        plan = src.open()
        w = session.disk_writer("d1", "00000000-0000-0000-0000-0000000000d1", plan.size)
        result = copy_disk(src, plan, w, vdi="d1")
        session.commit({})
    assert sorted(puts) == [0, 0, 1, 2, 2]
    index = repo.read_index(result.index_key)
    restored = b"".join(repo.iter_disk(index))
    assert restored == qemu_raw(vhd, tmp_path)
    repo.close()


class Failing(VhdFileSource):
    def _workers(self, blocks):
        def run(emit):
            raise OSError("disk on fire")

        return [run]


def test_one_failing_disk_cancels_the_others(tmp_path):
    good = make_vhd(tmp_path / "a.vhd", [(0, 8 * MiB, 0x41)])
    bad = make_vhd(tmp_path / "b.vhd", [(0, MiB, 0x42)])
    repo = Repository.init(str(tmp_path / "repo"))
    cancel = threading.Event()
    with repo.begin_backup("vm") as session:
        jobs = []
        for name, path, cls in (("a", good, VhdFileSource), ("b", bad, Failing)):
            src = cls(str(path))
            plan = src.open()
            w = session.disk_writer(name, f"00000000-0000-0000-0000-0000000000{name}a", plan.size)
            jobs.append({"source": src, "plan": plan, "writer": w, "vdi": name})
        with pytest.raises(SourceError, match="disk on fire"):
            copy_disks(jobs, cancel=cancel)
        assert cancel.is_set()
        session.abort()
    assert repo.scan().indexes == []
    with pytest.raises(Cancelled):
        src = VhdFileSource(str(good))
        with repo.begin_backup("vm2") as s2:
            plan = src.open()
            w = s2.disk_writer("a", "00000000-0000-0000-0000-0000000000aa", plan.size)
            ev = threading.Event()
            ev.set()
            copy_disk(src, plan, w, vdi="a", cancel=ev)
    repo.close()


def test_an_incremental_heals_a_damaged_chunk_it_would_inherit(tmp_path):
    """verify --mark found a damaged chunk; the next incremental, even with nothing changed on
    that block, reads it again and stores it, so the OLD point restores correctly again."""
    from orchestrator.jobs.verify import run_verify
    from orchestrator.repo.codec import chunk_key
    from orchestrator.repo.damage import damaged_digests

    vhd = make_vhd(tmp_path / "d.vhd", [(0, 2 * MiB, 0x31), (2 * MiB, 2 * MiB, 0x32)])
    want = qemu_raw(vhd, tmp_path)
    repo = Repository.init(str(tmp_path / "repo"))
    vdi = "00000000-0000-0000-0000-0000000000d1"
    src = VhdFileSource(str(vhd))
    with src, repo.begin_backup("vm") as session:
        plan = src.open()
        w = session.disk_writer("d1", vdi, plan.size)
        first = copy_disk(src, plan, w, vdi="d1").index_key
        session.commit({})
    digest = list(repo.read_index(first).digests())[1]
    path = tmp_path / "repo" / chunk_key(digest)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run_verify(repo, mark=True)["marked"] == 1
    src = VhdFileSource(str(vhd))
    with src, repo.begin_backup("vm") as session:
        plan = src.open()
        plan.blocks = []  # an incremental in which nothing changed
        w = session.disk_writer("d1", vdi, plan.size, base=first)
        result = copy_disk(src, plan, w, vdi="d1")
        session.commit({})
    assert result.blocks_read == 1 and any("healing" in n for n in result.notes)
    assert damaged_digests(repo.backend) == set()
    for key in (first, result.index_key):  # both points read right: one chunk, stored again
        assert b"".join(repo.iter_disk(repo.read_index(key))) == want
    assert run_verify(repo)["ok"]
    repo.close()
