"""Bad and refused QCOW2 images: qemu-img makes a valid image (or one with the feature we refuse),
the test breaks one field, and the reader must answer with a typed one-line error naming the file
and the field, never crash, hang or read outside the file (every pread and preadv is checked
against the file's size while these tests run)."""

import os
import struct

import pytest

from agent import qcow2
from agent.qcow2 import chain as chain_mod
from tests.qcow2.helpers import (
    KiB,
    MiB,
    create,
    io,
    patch,
    qemu_raw,
    read_be,
    run,
    write_random,
)


@pytest.fixture(autouse=True)
def strict_reads(monkeypatch):
    """Fail any read of a regular file that reaches past its end (or starts before 0)."""
    real_pread, real_preadv = os.pread, getattr(os, "preadv", None)
    seen = []

    def check(fd, length, offset):
        st = os.fstat(fd)
        if os.path.stat.S_ISREG(st.st_mode):
            assert 0 <= offset and offset + length <= st.st_size, (fd, offset, length, st.st_size)
        seen.append(length)

    def pread(fd, length, offset):
        check(fd, length, offset)
        return real_pread(fd, length, offset)

    def preadv(fd, buffers, offset):
        check(fd, sum(len(memoryview(b)) for b in buffers), offset)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "pread", pread)
    if real_preadv is not None:
        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(chain_mod, "_PREADV", preadv)
    return seen


def image(tmp_path, name="disk.qcow2", size=4 * MiB, data=True, **kw):
    p = create(tmp_path / name, size, **kw)
    if data:
        write_random(p, 0, 192 * KiB, 1)
        write_random(p, 2 * MiB, 64 * KiB, 2)
    return p


def l1_entry(path, i=0):
    return read_be(path, read_be(path, 40, 8) + 8 * i, 8)


def l2_offset(path):
    return l1_entry(path) & 0x00FFFFFFFFFFFE00


def expect(cls, path, field=None, read=False, **kw):
    """The error cls opening (or, read=True, reading all of) the chain at path."""
    with pytest.raises(cls) as ei:
        with qcow2.open_chain(path, **kw) as chain:
            if read:
                chain.read(0, chain.size)
                chain.extents()
    err = ei.value
    text = str(err)
    assert "\n" not in text and str(path) in text, text
    if field is not None:
        assert err.field is not None and field in err.field, (err.field, text)
    return err


def test_l1_entry_past_the_end(tmp_path):
    p = image(tmp_path)
    patch(p, read_be(p, 40, 8), struct.pack(">Q", (1 << 63) | (1 << 40)))
    err = expect(qcow2.CorruptQcow2, p, "L1[0]")
    assert "past the end" in str(err)


def test_l1_entry_unaligned(tmp_path):
    p = image(tmp_path)
    patch(p, read_be(p, 40, 8), struct.pack(">Q", l1_entry(p) + 512))
    expect(qcow2.CorruptQcow2, p, "L1[0]")


def test_l1_table_past_the_end(tmp_path):
    p = image(tmp_path)
    patch(p, 40, struct.pack(">Q", 1 << 30))
    expect(qcow2.CorruptQcow2, p, "l1_table_offset")


def test_l1_table_too_small_for_the_size(tmp_path):
    p = image(tmp_path)
    patch(p, 24, struct.pack(">Q", 1 << 40))  # 1 TiB needs 2048 L1 entries; the image has 1
    expect(qcow2.CorruptQcow2, p, "l1_size")


@pytest.mark.parametrize("size", [1 << 62 | 1, (1 << 64) - 1])
def test_absurd_sizes(tmp_path, size):
    p = image(tmp_path)
    patch(p, 24, struct.pack(">Q", size))
    expect(qcow2.Qcow2Error, p, "size")


def test_huge_l1_table_claimed(tmp_path):
    """A size that needs an L1 table bigger than qemu's 32 MiB limit is refused before reading."""
    p = image(tmp_path)
    patch(p, 20, struct.pack(">I", 9))  # 512 B clusters: 32 KiB per L2 table
    patch(p, 24, struct.pack(">Q", 1 << 50))
    expect(qcow2.UnsupportedQcow2, p, "size")


def test_l2_entry_past_the_end_fails_the_read(tmp_path):
    p = image(tmp_path)
    patch(p, l2_offset(p), struct.pack(">Q", (1 << 63) | (1 << 45)))
    with qcow2.open_chain(p) as chain:  # L2 tables are checked when first read
        with pytest.raises(qcow2.CorruptQcow2) as ei:
            chain.read(0, 4096)
    assert "L2[0] of L1[0]" in ei.value.field and "past the end" in str(ei.value)
    expect(qcow2.CorruptQcow2, p, "L2[0]", read=True)


def test_l2_entry_unaligned(tmp_path):
    p = image(tmp_path)
    first = read_be(p, l2_offset(p), 8)
    patch(p, l2_offset(p) + 8, struct.pack(">Q", (first & ~(1 << 63)) + 4096))
    expect(qcow2.CorruptQcow2, p, "L2[1] of L1[0]", read=True)


def test_last_cluster_cut_short_reads_zeros(tmp_path, strict_reads):
    """A data cluster that the end of the file cuts in two: the missing part reads as zeros, as
    qemu reads it, and no read goes past the end."""
    p = image(tmp_path, data=False)
    write_random(p, 0, 64 * KiB, 3)
    host = read_be(p, l2_offset(p), 8) & 0x00FFFFFFFFFFFE00
    assert host + 64 * KiB == os.path.getsize(p)  # the data cluster is the file's last
    os.truncate(p, host + 1000)
    want = qemu_raw(p)
    assert want[1000:65536].count(0) == 65536 - 1000
    del strict_reads[:]
    with qcow2.open_chain(p) as chain:
        assert chain.read(0, chain.size) == want
        src = chain.block_source(0)
        assert src.kind == "pieces" and src.pieces[0][2] == 1000
    assert 1000 in strict_reads  # the checked reads are the ones made (the fixture is live)


def test_refcounts_are_not_read(tmp_path):
    p = image(tmp_path)
    want = qemu_raw(p)
    table = read_be(p, 48, 8)
    patch(p, table, b"\xa5" * 64)  # refcount table garbage
    patch(p, 48, struct.pack(">Q", 1 << 50))  # and pointing nowhere
    with qcow2.open_chain(p) as chain:
        assert chain.read(0, chain.size) == want


def test_backing_loop(tmp_path):
    a = image(tmp_path, "a.qcow2")
    b = create(tmp_path / "b.qcow2", backing="a.qcow2")
    c = create(tmp_path / "c.qcow2", backing="b.qcow2")
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "c.qcow2", a])
    err = expect(qcow2.Qcow2ChainError, c, "backing file name")
    assert "loop" in str(err)
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "a.qcow2", a])
    expect(qcow2.Qcow2ChainError, a)  # its own backing file
    del b


def test_depth_limit(tmp_path):
    prev = image(tmp_path, "l0.qcow2")
    for i in range(1, 6):
        prev = create(tmp_path / ("l%d.qcow2" % i), backing=os.path.basename(prev))
    expect(qcow2.Qcow2ChainError, prev, "depth", max_depth=4)
    with qcow2.open_chain(prev, max_depth=6) as chain:
        assert chain.depth == 6


def test_missing_backing_file(tmp_path):
    leaf = str(tmp_path / "leaf.qcow2")
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            leaf,
            "4M",
        ]
    )
    err = expect(qcow2.Qcow2ChainError, leaf, "backing file name")
    assert "gone.qcow2" in str(err)


def test_backing_file_of_another_kind(tmp_path):
    vhd = str(tmp_path / "base.vhd")
    run(["qemu-img", "create", "-q", "-f", "vpc", vhd, "4M"])
    leaf = create(tmp_path / "leaf.qcow2", 4 * MiB, backing="base.vhd", backing_fmt="vpc")
    expect(qcow2.UnsupportedQcow2, leaf, "backing format")
    # no format recorded (the extension's type overwritten): probed, and a VHD is not raw data
    hlen = read_be(leaf, 100, 4)
    assert read_be(leaf, hlen, 4) == 0xE2792ACA
    patch(leaf, hlen, struct.pack(">I", 0x0BADF00D))
    err = expect(qcow2.UnsupportedQcow2, leaf, "backing file name")
    assert "VHD" in str(err)
    # not a local file
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", "nbd://h/x", leaf])
    expect(qcow2.UnsupportedQcow2, leaf, "backing file name")


def test_compressed_cluster_with_garbage(tmp_path):
    src = image(tmp_path, "src.qcow2", data=False)
    io(src, "write -P 0x61 0 1M")
    packed = str(tmp_path / "packed.qcow2")
    run(["qemu-img", "convert", "-c", "-O", "qcow2", src, packed])
    entry = read_be(packed, l2_offset(packed), 8)
    assert entry >> 62 & 1  # compressed
    coff = entry & ((1 << 54) - 1)
    patch(packed, coff, b"\xff" * 64)
    err = expect(qcow2.CorruptQcow2, packed, "compressed cluster", read=True)
    assert "inflate" in str(err)


@pytest.mark.parametrize(
    "opts, field, words",
    [
        (["compression_type=zstd"], "compression_type", "zstd"),
        (["extended_l2=on"], "incompatible_features", "extended L2"),
        # qemu-img makes a relative data file in its cwd: keep it in tmp_path
        (["data_file={tmp}/external.raw"], "incompatible_features", "external data file"),
    ],
)
def test_refused_features(tmp_path, opts, field, words):
    opts = [o.format(tmp=tmp_path) for o in opts]
    p = create(tmp_path / "f.qcow2", 4 * MiB, opts=opts)
    err = expect(qcow2.UnsupportedQcow2, p, field)
    assert words in str(err)


@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_encrypted_refused(tmp_path, fmt):
    p = str(tmp_path / "enc.qcow2")
    opts = "encrypt.format=%s,encrypt.key-secret=sec0" % fmt
    if fmt == "aes":
        opts += ",compat=0.10"
    else:
        opts += ",encrypt.iter-time=200"  # LUKS key derivation, timed by qemu on a busy machine
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=pw"]
    for _attempt in range(5):  # qemu's PBKDF timing can fail: "Unable to get accurate CPU usage"
        if run(cmd + ["-o", opts, p, "4M"], check=False).returncode == 0:
            break
    assert os.path.exists(p)
    err = expect(qcow2.UnsupportedQcow2, p, "crypt_method")
    assert "encrypted (%s)" % fmt.upper() in str(err)


def test_corrupt_bit_and_unknown_features(tmp_path):
    p = image(tmp_path)
    patch(p, 72, struct.pack(">Q", 1 << 1))
    expect(qcow2.CorruptQcow2, p, "incompatible_features")
    patch(p, 72, struct.pack(">Q", 1 << 5))
    err = expect(qcow2.UnsupportedQcow2, p, "incompatible_features")
    assert "bit 5" in str(err)
    patch(p, 72, struct.pack(">Q", 1 << 0))  # dirty: read anyway (refcounts are not used)
    with qcow2.open_chain(p) as chain:
        assert chain.describe()["files"][0]["dirty"] is True
        io(p, "read 0 4096")


def test_header_fields(tmp_path):
    p = image(tmp_path)
    good = open(p, "rb").read(112)
    cases = [
        (4, struct.pack(">I", 4), qcow2.UnsupportedQcow2, "version"),
        (20, struct.pack(">I", 22), qcow2.UnsupportedQcow2, "cluster_bits"),
        (20, struct.pack(">I", 8), qcow2.UnsupportedQcow2, "cluster_bits"),
        (100, struct.pack(">I", 100), qcow2.CorruptQcow2, "header_length"),
        (100, struct.pack(">I", 1 << 20), qcow2.CorruptQcow2, "header_length"),
        (96, struct.pack(">I", 7), qcow2.CorruptQcow2, "refcount_order"),
        (0, b"QFI\x00", qcow2.CorruptQcow2, "header magic"),
    ]
    for off, data, cls, field in cases:
        patch(p, 0, good)
        patch(p, off, data)
        expect(cls, p, field)


def test_backing_name_outside_the_first_cluster(tmp_path):
    image(tmp_path, "base.qcow2")
    leaf = create(tmp_path / "leaf.qcow2", backing="base.qcow2")
    patch(leaf, 8, struct.pack(">Q", 65530))
    expect(qcow2.CorruptQcow2, leaf, "backing_file_offset")
    patch(leaf, 8, struct.pack(">Q", 1 << 40))
    expect(qcow2.CorruptQcow2, leaf, "backing_file_offset")


def test_extension_running_past_the_header(tmp_path):
    p = image(tmp_path)
    hlen = read_be(p, 100, 4)
    patch(p, hlen + 4, struct.pack(">I", 1 << 20))  # the first extension's length
    expect(qcow2.CorruptQcow2, p, "header extension")


@pytest.mark.parametrize("length", [0, 3, 50, 104])
def test_truncated_files(tmp_path, length):
    p = image(tmp_path)
    os.truncate(p, length)
    expect(qcow2.Qcow2Error, p)


def test_not_qcow2_at_all(tmp_path):
    p = tmp_path / "raw.img"
    p.write_bytes(bytes(4096))
    expect(qcow2.CorruptQcow2, str(p), "header magic")
    fifo = str(tmp_path / "fifo")  # what a hostile backing name may point at: never blocks
    os.mkfifo(fifo)
    expect(qcow2.UnsupportedQcow2, fifo)
    leaf = create(tmp_path / "leaf.qcow2", 4 * MiB, backing="raw.img", backing_fmt="raw")
    os.unlink(str(p))
    os.mkfifo(str(p))
    err = expect(qcow2.Qcow2ChainError, leaf, "backing file name")
    assert "raw.img" in str(err)  # not opened at all: only regular files and devices are
