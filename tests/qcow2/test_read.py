"""The QCOW2 reader against qemu: images and chains made by qemu-img/qemu-io, read back byte for
byte as `qemu-img convert -O raw` decodes them, extents as `qemu-img map --output=json` reports
them, block sources consistent with the bytes (every 'file'/'pieces' piece reads what the block
holds)."""

import os
import random

import pytest

from agent import qcow2
from tests.qcow2.helpers import (
    KiB,
    MiB,
    create,
    io,
    our_zero_runs,
    qemu_raw,
    qemu_zero_runs,
    run,
    sm_chain,
    write_random,
)


def check_against_qemu(path, **open_kw):
    """Open the chain at path and compare everything we read with qemu's answers."""
    want = qemu_raw(path)
    with qcow2.open_chain(path, **open_kw) as chain:
        assert chain.size == len(want)
        assert chain.read(0, chain.size) == want
        assert our_zero_runs(chain) == qemu_zero_runs(path)
        for e in chain.extents():
            if e.zero:
                assert want[e.offset : e.offset + e.length].count(0) == e.length
        for i in range(chain.block_count):
            start, length = chain.block_range(i)
            block = want[start : start + length]
            assert chain.read_block(i) == block, i
            buf = bytearray(chain.block_size)
            assert chain.read_block_into(i, buf) == length and bytes(buf[:length]) == block
            assert source_bytes(chain.block_source(i), chain, i) == block, i
        rnd = random.Random(len(want))
        for _ in range(40):
            off = rnd.randrange(0, chain.size)
            n = rnd.randrange(0, min(chain.size - off, 5 * MiB) + 1)
            assert chain.read(off, n) == want[off : off + n], (off, n)
        return chain.describe()


def source_bytes(src, chain, index):
    """The bytes a block source describes, read the way a server would (pread per piece)."""
    if src.kind == "zero":
        return bytes(src.length)
    if src.kind == "file":
        return os.pread(src.file.fileno(), src.length, src.offset)
    if src.kind == "pieces":
        out = []
        for level, off, n in src.pieces:
            out.append(bytes(n) if level is None else os.pread(level.fileno(), n, off))
            assert level is None or len(out[-1]) == n
        data = b"".join(out)
        assert len(data) == src.length
        return data
    assert src.kind == "assemble"
    return chain.read_block(index)


def flat_writes(path, size, seed):
    """Writes of every shape: aligned and not, inside and across clusters and blocks, zeros and
    discards over data, the disk's last byte."""
    rnd = random.Random(seed)
    for i in range(6):
        off = rnd.randrange(0, size - 1)
        n = min(rnd.choice((1, 511, 4 * KiB, 64 * KiB + 7, 700 * KiB, 3 * MiB)), size - off)
        write_random(path, off, n, seed + i)
    write_random(path, 2 * MiB - 4 * KiB, 8 * KiB, seed + 50)  # across a block boundary
    write_random(path, size - 512, 512, seed + 51)
    io(path, "write -z %d %d" % (MiB, 256 * KiB), "discard %d %d" % (3 * MiB, 128 * KiB))


@pytest.mark.parametrize("cluster", [512, 4 * KiB, 64 * KiB, 512 * KiB, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_flat_image(tmp_path, qemu_tools, cluster, compat):
    size = 9 * MiB + 64 * KiB  # not a multiple of the 2 MiB block
    p = create(tmp_path / "flat.qcow2", size, cluster=cluster, compat=compat)
    flat_writes(p, size, cluster)
    desc = check_against_qemu(p)
    leaf = desc["files"][0]
    assert leaf["cluster_size"] == cluster and leaf["version"] == (2 if compat == "0.10" else 3)
    assert desc["block_size"] == 2 * MiB


def test_empty_and_tiny_images(tmp_path, qemu_tools):
    for size in (0, 512, 64 * KiB + 512):
        p = create(tmp_path / ("t%d.qcow2" % size), size)
        with qcow2.open_chain(p) as chain:
            assert chain.size == size and chain.read(0, size) == bytes(size)
            assert chain.allocated_blocks() == []
            assert all(e.zero for e in chain.extents())


def test_sequential_image_is_one_sendfile_per_block(tmp_path, qemu_tools):
    """A disk written front to back: each block's clusters are contiguous in the file."""
    p = create(tmp_path / "seq.qcow2", 8 * MiB)
    write_random(p, 0, 8 * MiB, 3)
    check_against_qemu(p)
    with qcow2.open_chain(p) as chain:
        kinds = [chain.block_source(i).kind for i in range(chain.block_count)]
    assert kinds == ["file"] * 4


def test_three_deep_chain_as_sm_makes_it(tmp_path, qemu_tools):
    """Relative backing names (bare <uuid>.qcow2), 64 KiB clusters, writes at every level."""
    paths = sm_chain(tmp_path, 20 * MiB, 3, seed=7)
    desc = check_against_qemu(paths[-1])
    assert desc["depth"] == 3
    assert [f["path"] for f in desc["files"]] == [os.path.abspath(p) for p in reversed(paths)]
    assert desc["files"][0]["backing_file"] == os.path.basename(paths[1])
    with qcow2.open_chain(paths[-1]) as chain:
        kinds = {chain.block_source(i).kind for i in range(chain.block_count)}
    assert "pieces" in kinds  # blocks mixing levels are still sent piece by piece, not assembled


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_zero_and_discard_hide_the_backing_file(tmp_path, qemu_tools, compat):
    base = create(tmp_path / "base.qcow2", 8 * MiB, compat=compat)
    write_random(base, 0, 8 * MiB, 1)
    leaf = create(tmp_path / "leaf.qcow2", compat=compat, backing="base.qcow2")
    io(leaf, "write -z 0 %d" % (2 * MiB), "write -z %d 4096" % (3 * MiB))
    io(leaf, "discard %d %d" % (5 * MiB, 2 * MiB))
    write_random(leaf, 2 * MiB + 123, 1000, 2)
    check_against_qemu(leaf)
    with qcow2.open_chain(leaf) as chain:
        # v3 zero clusters over data: no backing read; v2 has no zero flag (qemu writes zeros)
        assert chain.block_source(0).kind == ("zero" if compat == "1.1" else "file")


def test_backing_file_smaller_than_child(tmp_path, qemu_tools):
    base = create(tmp_path / "base.qcow2", 3 * MiB + 64 * KiB)
    write_random(base, 0, 3 * MiB + 64 * KiB, 4)
    mid = create(tmp_path / "mid.qcow2", 5 * MiB, backing="base.qcow2")
    write_random(mid, 4 * MiB, 64 * KiB, 5)
    leaf = create(tmp_path / "leaf.qcow2", 9 * MiB, backing="mid.qcow2")
    write_random(leaf, 8 * MiB, 4 * KiB, 6)
    check_against_qemu(leaf)
    # grown after the snapshot: the child is bigger, the bytes past the parent are zeros
    io(leaf, "discard 0 %d" % (9 * MiB))
    check_against_qemu(leaf)


def test_absolute_and_moved_backing_names(tmp_path, qemu_tools):
    """SM's compose writes absolute paths; an SR mounted elsewhere finds the parent beside."""
    base = create(tmp_path / "base.qcow2", 4 * MiB)
    write_random(base, 0, MiB, 8)
    leaf = create(tmp_path / "leaf.qcow2", backing=str(tmp_path / "base.qcow2"))
    write_random(leaf, MiB // 2, MiB, 9)
    check_against_qemu(leaf)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    want = qemu_raw(leaf)
    for name in ("base.qcow2", "leaf.qcow2"):
        os.rename(str(tmp_path / name), str(moved / name))
    with qcow2.open_chain(str(moved / "leaf.qcow2")) as chain:
        assert chain.files[1].path == str(moved / "base.qcow2")
        assert chain.read(0, chain.size) == want


def test_raw_backing_file(tmp_path, qemu_tools):
    raw = tmp_path / "base.raw"
    raw.write_bytes(os.urandom(3 * MiB))
    leaf = create(tmp_path / "leaf.qcow2", 4 * MiB, backing="base.raw", backing_fmt="raw")
    write_random(leaf, MiB, 64 * KiB, 10)
    want = qemu_raw(leaf)
    with qcow2.open_chain(leaf) as chain:
        assert chain.files[1].kind == "raw"
        assert chain.read(0, chain.size) == want
        # qemu maps holes inside a raw file by SEEK_HOLE; we only know the file's size
        assert [e.zero for e in chain.extents()] == [False, True]


def test_compressed_clusters_are_inflated(tmp_path, qemu_tools):
    src = create(tmp_path / "src.qcow2", 6 * MiB)
    write_random(src, 0, 2 * MiB, 11)
    io(src, "write -P 0x41 %d %d" % (2 * MiB, 3 * MiB))  # compresses well
    packed = str(tmp_path / "packed.qcow2")
    run(["qemu-img", "convert", "-c", "-O", "qcow2", src, packed])
    check_against_qemu(packed)
    with qcow2.open_chain(packed) as chain:
        assert chain.block_source(1).kind == "assemble"
    # a compressed base under a plain child
    leaf = create(tmp_path / "leaf.qcow2", backing="packed.qcow2")
    write_random(leaf, 2 * MiB + 100, 5000, 12)
    check_against_qemu(leaf)


def test_internal_snapshot_is_ignored(tmp_path, qemu_tools):
    p = create(tmp_path / "snap.qcow2", 4 * MiB)
    write_random(p, 0, MiB, 13)
    run(["qemu-img", "snapshot", "-c", "s1", p])
    write_random(p, 0, 512 * KiB, 14)
    desc = check_against_qemu(p)
    assert desc["files"][0]["snapshots"] == 1


def test_sm_hidden_flag_and_uuid_from_the_name(tmp_path, qemu_tools):
    """SM keeps `hidden` in a header extension of type 'vate' (qcow2util._add_or_find_custom_header),
    written by hand here as SM does: after the existing extensions, before the backing name."""
    import struct
    import uuid as uuidlib

    vdi = str(uuidlib.uuid4())
    p = create(tmp_path / ("%s.qcow2" % vdi), 4 * MiB, compat="0.10")
    with open(p, "r+b") as f:
        f.seek(72)
        assert f.read(4) == b"\0\0\0\0"  # v2, no extensions: the end marker
        f.seek(72)
        f.write(struct.pack(">IIQ", 0x76617465, 8, 0) + bytes(8))
        f.seek(72 + 8)
        f.write(b"\x01")
    io(p, "read 0 512")  # qemu still opens it (an unknown extension is ignored)
    with qcow2.open_chain(p) as chain:
        assert chain.files[0].hidden == 1 and str(chain.uuid) == vdi


def test_concurrent_readers_parse_each_l2_table_once(tmp_path, qemu_tools, monkeypatch):
    """The NBD connections of one export ask for the same L2 tables at the same moment (nbdcopy's
    first BLOCK_STATUS on each): each table is read and parsed once, and every thread gets the
    extents qemu reports."""
    import threading
    import time

    from agent.qcow2 import file as qfile

    p = create(tmp_path / "img.qcow2", 8 * MiB, cluster=4 * KiB)  # 512 entries: 2 MiB a table
    for k in range(4):
        write_random(p, k * 2 * MiB + 8 * KiB, 64 * KiB, 30 + k)
    parsed = []
    real = qfile.Qcow2File._table_runs

    def slow_parse(self, l1i, raw):
        parsed.append(l1i)
        time.sleep(0.05)  # wide enough for every thread to miss the cache without the lock
        return real(self, l1i, raw)

    monkeypatch.setattr(qfile.Qcow2File, "_table_runs", slow_parse)
    want = qemu_zero_runs(p)
    with qcow2.open_chain(p) as chain:
        start = threading.Barrier(4)
        got = []

        def reader():
            start.wait()
            got.append(our_zero_runs(chain))

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got == [want] * 4
    assert sorted(parsed) == [0, 1, 2, 3]
