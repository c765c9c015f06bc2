"""Hostile and broken input: every bad file raises a typed VhdError naming the file and the field, before
any out-of-file read or unbounded allocation; a short hypothesis fuzz mutates valid files."""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import vhd
from agent.vhd import format as fmt
from tests.fixtures.vhd import Level, MiB, build_chain, pattern, run


def make(tmp_path, size=6 * MiB, writes=None, name="d.vhd", **kw):
    if writes is None:
        writes = [
            (0, pattern(1, 4096)),
            (2 * MiB, pattern(2, 2 * MiB)),
            (5 * MiB + 512, pattern(3, 1024)),
        ]
    paths, models = build_chain(tmp_path, [Level(size, writes, name=name, **kw)])
    return paths[0], models[0]


def read_footer(path, where="end"):
    with open(path, "rb") as f:
        if where == "end":
            f.seek(-512, 2)
        return fmt.Footer.parse(f.read(512))


def write_footers(path, footer, which=("end", "copy"), fix_checksum=True):
    raw = footer.build() if fix_checksum else _pack_footer_keep_checksum(footer)
    with open(path, "r+b") as f:
        if "end" in which:
            f.seek(-512, 2)
            f.write(raw)
        if "copy" in which:
            f.seek(0)
            f.write(raw)


def _pack_footer_keep_checksum(footer):
    stored = footer.checksum
    raw = bytearray(footer.build())
    struct.pack_into(">I", raw, 64, stored)
    return bytes(raw)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_header(path):
    with open(path, "rb") as f:
        f.seek(512)
        return fmt.Header.parse(f.read(1024))


def write_header(path, header):
    patch(path, 512, header.build())


def bat(path):
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h.table_offset)
        return list(struct.unpack(">%dI" % h.max_table_entries, f.read(4 * h.max_table_entries)))


def set_bat(path, index, value):
    h = read_header(path)
    patch(path, h.table_offset + 4 * index, struct.pack(">I", value))


def expect(exc_type, path, field=None, **kw):
    with pytest.raises(exc_type) as info:
        with vhd.open_chain(path, **kw) as c:
            c.read(0, c.size)
    err = info.value
    assert isinstance(err, vhd.VhdError)
    assert os.path.basename(err.path) in str(err) or err.path in str(err)
    if field is not None:
        assert err.field is not None and field in err.field, (err.field, str(err))
    return err


def test_good_file_reads(tmp_path):
    p, model = make(tmp_path)
    with vhd.open_chain(p) as c:
        assert c.read(0, c.size) == bytes(model)


@pytest.mark.parametrize("length", [0, 100, 511, 512, 1000, 1536, 2048, 4096])
def test_truncated_to_metadata(tmp_path, length):
    p, _ = make(tmp_path)
    os.truncate(p, length)
    with pytest.raises(vhd.VhdError):
        with vhd.open_chain(p, allow_raw=False) as c:
            c.read(0, c.size)


def test_truncated_mid_data(tmp_path):
    p, _ = make(tmp_path)
    os.truncate(p, 3 * MiB)
    err = expect(vhd.CorruptVhd, p, "BAT[")
    assert "past the end" in str(err)


def test_footer_missing_uses_copy(tmp_path):
    p, model = make(tmp_path)
    os.truncate(p, os.path.getsize(p) - 512)
    with vhd.open_chain(p) as c:
        assert c.files[0].footer_at == "copy"
        assert c.read(0, c.size) == bytes(model)


def test_short_footer(tmp_path):
    """blktap accepts a 511-byte footer at EOF-511."""
    p, model = make(tmp_path)
    os.truncate(p, os.path.getsize(p) - 1)
    patch(p, 0, b"\x00" * 8)  # no copy to fall back on
    with vhd.open_chain(p) as c:
        assert c.files[0].footer_at == "short"
        assert c.read(0, c.size) == bytes(model)


def test_bad_footer_checksum(tmp_path):
    p, _ = make(tmp_path)
    f = read_footer(p)
    f.current_size += 512
    write_footers(p, f, fix_checksum=False)
    expect(vhd.CorruptVhd, p, "footer")


def test_bad_end_footer_falls_back_to_good_copy(tmp_path):
    p, model = make(tmp_path)
    with open(p, "r+b") as fh:
        fh.seek(-512 + 70, 2)
        fh.write(b"\xff")
    with vhd.open_chain(p) as c:
        assert c.files[0].footer_at == "copy"
        assert c.read(0, c.size) == bytes(model)


def test_old_tap_hidden_checksum_quirk(tmp_path):
    p, _ = make(tmp_path)
    f = read_footer(p)
    f.creator_version = 0x00010001
    raw = bytearray(f.build())
    raw[85] = 1  # hidden set without recomputing the checksum, as early blktap did
    with open(p, "r+b") as fh:
        fh.seek(-512, 2)
        fh.write(raw)
        fh.seek(0)
        fh.write(raw)
    with vhd.open_chain(p) as c:
        assert c.files[0].hidden == 1


def test_bad_header_checksum(tmp_path):
    p, _ = make(tmp_path)
    patch(p, 512 + 40, b"\x01")
    expect(vhd.CorruptVhd, p, "header checksum")


def test_bad_header_cookie(tmp_path):
    p, _ = make(tmp_path)
    patch(p, 512, b"notspars")
    expect(vhd.CorruptVhd, p, "header cookie")


def test_header_offset_past_eof(tmp_path):
    p, _ = make(tmp_path)
    f = read_footer(p)
    f.data_offset = os.path.getsize(p) + 4096
    write_footers(p, f)
    expect(vhd.CorruptVhd, p, "data_offset")


def test_bat_entry_past_eof(tmp_path):
    p, _ = make(tmp_path)
    set_bat(p, 2, (os.path.getsize(p) + MiB) // 512)
    expect(vhd.CorruptVhd, p, "BAT[2]")


def test_bat_entry_huge(tmp_path):
    p, _ = make(tmp_path)
    set_bat(p, 0, 0xFFFFFFFE)
    expect(vhd.CorruptVhd, p, "BAT[0]")


def test_overlapping_blocks(tmp_path):
    p, _ = make(tmp_path)
    entries = bat(p)
    set_bat(p, 2, entries[1] + 8)
    err = expect(vhd.CorruptVhd, p, "BAT")
    assert "overlap" in str(err)


def test_duplicate_block(tmp_path):
    p, _ = make(tmp_path)
    entries = bat(p)
    set_bat(p, 2, entries[0])
    expect(vhd.CorruptVhd, p, "BAT")


def test_block_over_metadata(tmp_path):
    p, _ = make(tmp_path)
    set_bat(p, 0, 1)  # sector 1 = the dynamic header
    err = expect(vhd.CorruptVhd, p, "BAT")
    assert "header" in str(err) or "footer" in str(err)


def test_huge_table_refused_before_allocation(tmp_path):
    p, _ = make(tmp_path)
    h = read_header(p)
    h.max_table_entries = 0xFFFFFFFF
    write_header(p, h)
    expect(vhd.CorruptVhd, p, "table_offset")


def test_table_too_small_for_size(tmp_path):
    p, _ = make(tmp_path)
    h = read_header(p)
    h.max_table_entries = 1
    write_header(p, h)
    expect(vhd.CorruptVhd, p, "max_table_entries")


def test_oversized_table_is_valid(tmp_path):
    """LVM SRs pre-size the BAT for 2 TiB: more entries than the size needs is fine."""
    p, model = make(tmp_path, writes=[(0, b"a" * 512)])
    h = read_header(p)
    # room for 2 more sectors of entries was not reserved; use the batmap/locator gap instead: the
    # entries read past max needed are ignored anyway, so claim more as long as the table fits.
    h.max_table_entries = 200
    write_header(p, h)
    with vhd.open_chain(p) as c:
        assert c.read(0, c.size) == bytes(model)


@pytest.mark.parametrize("size", [2041 * (1 << 30), (1 << 64) - 512])
def test_size_beyond_vhd_maximum(tmp_path, size):
    p, _ = make(tmp_path)
    f = read_footer(p)
    f.current_size = size
    write_footers(p, f)
    expect(vhd.UnsupportedVhd, p, "current_size")


@pytest.mark.parametrize("block_size", [0, 1000, 3 * MiB, 1 << 31, 256])
def test_bad_block_size(tmp_path, block_size):
    p, _ = make(tmp_path)
    h = read_header(p)
    h.block_size = block_size
    write_header(p, h)
    expect(vhd.CorruptVhd, p, "block_size")


def test_unknown_disk_type(tmp_path):
    p, _ = make(tmp_path)
    f = read_footer(p)
    f.disk_type = 5
    write_footers(p, f)
    expect(vhd.UnsupportedVhd, p, "disk_type")


def test_v_poison(tmp_path):
    p, _ = make(tmp_path)
    f = read_footer(p)
    f.cookie = b"v_poison"
    write_footers(p, f)
    err = expect(vhd.UnsupportedVhd, p, "cookie")
    assert "v_poison" in str(err)


def test_qcow2_refused(tmp_path, qemu_tools):
    p = str(tmp_path / "disk.qcow2")
    run(["qemu-img", "create", "-f", "qcow2", p, "16M"])
    err = expect(vhd.UnsupportedVhd, p)
    assert "QCOW2" in str(err)


def test_keyhash_encrypted_refused(tmp_path):
    p, _ = make(tmp_path)
    h = read_header(p)
    off = h.table_offset + fmt.sectors_padded(h.max_table_entries * 4)
    with open(p, "rb") as fh:
        fh.seek(off)
        assert fh.read(8) == fmt.BATMAP_COOKIE
    patch(p, off + 29, b"\x01")  # struct vhd_keyhash.cookie after the marker byte
    err = expect(vhd.UnsupportedVhd, p, "keyhash")
    assert "encrypted" in str(err)


def test_bad_batmap_checksum_is_tolerated(tmp_path):
    p, model = make(tmp_path)
    h = read_header(p)
    off = h.table_offset + fmt.sectors_padded(h.max_table_entries * 4)
    patch(p, off + 512, b"\x00")  # first batmap byte: block 2 is full, now claims not
    patch(p, off + 512, b"\xff")  # ... and now claims every block full, with a stale checksum
    with vhd.open_chain(p) as c:
        assert c.files[0].batmap is None
        assert c.read(0, c.size) == bytes(model)


def test_locator_past_eof(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(2 * MiB), Level(2 * MiB)])
    h = read_header(paths[1])
    h.locators[0].data_offset = os.path.getsize(paths[1]) + 100
    write_header(paths[1], h)
    expect(vhd.CorruptVhd, paths[1], "parent locator 0")


def test_missing_parent(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(2 * MiB), Level(2 * MiB)])
    os.unlink(paths[0])
    err = expect(vhd.ChainError, paths[1], "parent locator")
    assert "not found" in str(err)


def test_wrong_parent_uuid(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(2 * MiB), Level(2 * MiB)])
    os.unlink(paths[0])
    vhd.create_dynamic(paths[0], 2 * MiB).close()  # same name, another disk
    err = expect(vhd.ChainError, paths[1], "parent_uuid")
    assert "expects" in str(err)


def test_parent_loop(tmp_path):
    """a.vhd -> b.vhd -> a.vhd: made by re-pointing a's parent (uuid and locators) at its own child."""
    levels = [
        Level(2 * MiB, name="p.vhd"),
        Level(2 * MiB, name="a.vhd"),
        Level(2 * MiB, name="b.vhd"),
    ]
    paths, _ = build_chain(tmp_path, levels)
    a, b = paths[1], paths[2]
    with vhd.VhdFile.open(b) as fb:
        b_uuid = fb.uuid
    data = bytearray(open(a, "rb").read())
    for old, new in ((b"p.vhd", b"b.vhd"),):
        for enc in ("utf-8", "utf-16-le", "utf-16-be"):
            data = data.replace(old.decode().encode(enc), new.decode().encode(enc))
    open(a, "wb").write(bytes(data))
    h = read_header(a)
    h.parent_uuid = b_uuid
    write_header(a, h)
    err = expect(vhd.ChainError, b, "parent locator")
    assert "loop" in str(err)


def test_depth_limit(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(MiB) for _ in range(5)])
    expect(vhd.ChainError, paths[-1], "depth", max_depth=3)
    with vhd.open_chain(paths[-1], max_depth=5) as c:
        assert c.depth == 5


def test_parent_is_not_a_vhd_but_uuid_set(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(2 * MiB), Level(2 * MiB)])
    with open(paths[0], "wb") as f:
        f.write(bytes(2 * MiB))
    expect(vhd.ChainError, paths[1])


def test_fixed_disk_larger_than_file(tmp_path, qemu_tools):
    p = str(tmp_path / "fixed.vhd")
    run(["qemu-img", "create", "-f", "vpc", "-o", "subformat=fixed", p, "2M"])
    f = read_footer(p)
    f.current_size = 64 * MiB
    write_footers(p, f, which=("end",))
    expect(vhd.CorruptVhd, p, "current_size")


# -- fuzz ----------------------------------------------------------------------------------------------


def _fuzz_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    levels = [
        Level(3 * MiB, [(0, pattern(1, 3 * MiB))], block_size=512 * 1024),
        Level(
            3 * MiB,
            [
                (4096, pattern(2, 8192)),
                (MiB + 512, pattern(3, 700)),
                (2 * MiB, pattern(4, 512 * 1024)),
            ],
            block_size=512 * 1024,
        ),
    ]
    paths, models = build_chain(d, levels)
    return paths, [open(p, "rb").read() for p in paths], models[1]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    return _fuzz_target(tmp_path_factory)


def _hot_offsets(size):
    """Offsets worth mutating: metadata at the front, the footer, and bitmap sectors."""
    return st.one_of(
        st.integers(0, 8191),
        st.integers(size - 512, size - 1),
        st.integers(0, size - 1),
    )


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_mutated_chain(tmp_path, fuzz_target, data):
    """Mutate bytes of the leaf or of its parent (metadata-heavy offsets, sometimes re-sealing the
    checksums): every outcome is consistent data or a VhdError, never another exception or a hang."""
    paths, originals, model = fuzz_target
    which = data.draw(st.sampled_from([1, 1, 0]))  # mostly the leaf
    pristine = originals[which]
    buf = bytearray(pristine)
    n = data.draw(st.integers(1, 8))
    for _ in range(n):
        off = data.draw(_hot_offsets(len(buf)))
        buf[off] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        # also re-seal the footers so the mutation gets past the checksum
        footer = fmt.Footer.parse(bytes(buf[-512:]))
        if footer.cookie == fmt.FOOTER_COOKIE:
            raw = footer.build()
            buf[-512:] = raw
            buf[:512] = raw
        header = fmt.Header.parse(bytes(buf[512:1536]))
        if header.cookie == fmt.HEADER_COOKIE:
            buf[512:1536] = header.build()
    d = os.path.dirname(paths[1])
    leaf = os.path.join(d, "mutant-leaf-%d.vhd" % os.getpid())
    root = os.path.join(d, "mutant-root-%d.vhd" % os.getpid())
    for path, content in ((root, originals[0]), (leaf, originals[1])):
        with open(path, "wb") as f:
            f.write(bytes(buf) if path == (leaf if which == 1 else root) else content)
    try:
        with vhd.open_chain(leaf, allow_raw=False, resolve_parent=lambda child, locs: root) as c:
            if c.size > 64 * MiB:  # a mutated size: sample instead of allocating gigabytes here
                c.read(c.size - 4096, 4096)
                c.extents()
                c.block_source(c.block_count - 1)
                return
            got = c.read(0, c.size)
            assert len(got) == c.size
            c.extents()
            for i in range(c.block_count):
                src = c.block_source(i)
                assert src.kind in ("zero", "file", "assemble")
                if src.kind == "file":
                    assert src.file.data_range_ok(src.offset, src.length)
                assert c.read_block(i) == got[i * c.block_size : (i + 1) * c.block_size]
            if bytes(buf) == pristine:
                assert got == bytes(model)
    except vhd.VhdError:
        pass
    finally:
        os.unlink(leaf)
        os.unlink(root)


@pytest.mark.timeout(60)
def test_locator_naming_a_fifo_does_not_hang(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(2 * MiB), Level(2 * MiB)])
    os.unlink(paths[0])
    os.mkfifo(paths[0])
    expect(vhd.ChainError, paths[1], "parent locator")
    with pytest.raises(vhd.UnsupportedVhd, match="not a regular file"):
        vhd.VhdFile.open(paths[0])
    with pytest.raises(vhd.UnsupportedVhd):
        vhd.open_chain("/dev/zero")


def test_uuid_loop_through_copies(tmp_path):
    """A loop made of copies (distinct files, repeating uuids) is caught by uuid, not only by inode."""
    levels = [
        Level(2 * MiB, name="p.vhd"),
        Level(2 * MiB, name="a.vhd"),
        Level(2 * MiB, name="b.vhd"),
    ]
    paths, _ = build_chain(tmp_path, levels)
    a, b = paths[1], paths[2]
    with vhd.VhdFile.open(b) as fb:
        b_uuid = fb.uuid
    h = read_header(a)
    h.parent_uuid = b_uuid
    write_header(a, h)
    copy = str(tmp_path / "copy-of-b.vhd")
    with open(b, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    order = {"b.vhd": a, "a.vhd": copy, "copy-of-b.vhd": a}

    def resolve(child, locators):
        return order[os.path.basename(child.path)]

    with pytest.raises(vhd.ChainError, match="same uuid"):
        vhd.open_chain(b, resolve_parent=resolve)
