"""Chain reads, extents, block sources, changed blocks on chains we build (the model is a bytearray).

Our reader judging our writer is not enough on its own: the oracle tests (qemu-img, pyvhdi) cover the
same files from outside; these tests pin down the chain semantics in detail.
"""

import os

import pytest

from agent import vhd
from agent.vhd import format as fmt
from tests.fixtures.vhd import Level, MiB, build_chain, pattern


def read_all(chain):
    return chain.read(0, chain.size)


def test_single_dynamic_read_extents_sources(tmp_path):
    writes = [(0, pattern(1, 5000)), (3 * MiB, pattern(2, MiB)), (6 * MiB, pattern(3, 2 * MiB))]
    paths, models = build_chain(tmp_path, [Level(10 * MiB, writes)])
    with vhd.open_chain(paths[0]) as c:
        assert (
            c.size == 10 * MiB and c.block_size == 2 * MiB and c.block_count == 5 and c.depth == 1
        )
        assert read_all(c) == bytes(models[0])
        assert c.extents() == [
            vhd.Extent(0, 5120, False),
            vhd.Extent(5120, 3 * MiB - 5120, True),
            vhd.Extent(3 * MiB, MiB, False),
            vhd.Extent(4 * MiB, 2 * MiB, True),
            vhd.Extent(6 * MiB, 2 * MiB, False),
            vhd.Extent(8 * MiB, 2 * MiB, True),
        ]
        kinds = [c.block_source(i).kind for i in range(5)]
        assert kinds == ["assemble", "assemble", "zero", "file", "zero"]
        src = c.block_source(3)
        assert src.file is c.files[0] and src.length == 2 * MiB
        assert os.pread(src.file.fileno(), src.length, src.offset) == bytes(
            models[0][6 * MiB : 8 * MiB]
        )
        for i in range(5):
            assert c.read_block(i) == bytes(models[0][i * 2 * MiB : (i + 1) * 2 * MiB])
        f = c.files[0]
        assert f.hidden == 0 and f.parent_uuid is None and f.footer.creator_app == b"tap\x00"
        assert f.data_range_ok(src.offset, src.length)


def test_read_bounds(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(4 * MiB)])
    with vhd.open_chain(paths[0]) as c:
        with pytest.raises(ValueError):
            c.read(4 * MiB - 10, 11)
        with pytest.raises(ValueError):
            c.read(-1, 1)
        assert c.read(4 * MiB - 10, 10) == bytes(10)
        assert c.read(4 * MiB, 0) == b""
        with pytest.raises(ValueError):
            c.block_source(2)


def test_three_deep_chain_with_smaller_parent(tmp_path):
    levels = [
        Level(3 * MiB, [(0, pattern(1, 3 * MiB))]),
        Level(6 * MiB, [(MiB + 512, pattern(2, 1024)), (4 * MiB, pattern(3, 4096))]),
        Level(6 * MiB, [(100, pattern(4, 10)), (5 * MiB, pattern(5, MiB))]),
    ]
    paths, models = build_chain(tmp_path, levels)
    with vhd.open_chain(paths[-1]) as c:
        assert c.depth == 3
        assert [f.path for f in c.files] == paths[::-1]
        assert c.files[0].parent_uuid == c.files[1].uuid
        assert read_all(c) == bytes(models[-1])
        for off, ln in [(0, 1), (511, 2), (MiB + 500, 2000), (3 * MiB - 7, 20), (5 * MiB - 3, 9)]:
            assert c.read(off, ln) == bytes(models[-1][off : off + ln])
        # past the 3 MiB root nothing is allocated except the leaf's and middle's writes
        ext = c.extents(3 * MiB, 3 * MiB)
        assert ext == [
            vhd.Extent(3 * MiB, MiB, True),
            vhd.Extent(4 * MiB, 4096, False),
            vhd.Extent(4 * MiB + 4096, MiB - 4096, True),
            vhd.Extent(5 * MiB, MiB, False),
        ]
        for i in range(c.block_count):
            assert c.read_block(i) == bytes(models[-1][i * 2 * MiB : (i + 1) * 2 * MiB])
        assert c.block_source(2).kind == "assemble"


def test_changed_blocks(tmp_path):
    levels = [
        Level(8 * MiB, [(0, pattern(1, 8 * MiB))]),
        Level(8 * MiB, [(2 * MiB + 3, b"x")]),
        Level(8 * MiB, [(7 * MiB, b"y" * 512)]),
    ]
    paths, _ = build_chain(tmp_path, levels)
    with (
        vhd.open_chain(paths[2]) as leaf,
        vhd.open_chain(paths[1]) as mid,
        vhd.open_chain(paths[0]) as root,
    ):
        assert leaf.changed_blocks(mid) == [3]
        assert leaf.changed_blocks(root) == [1, 3]
        assert mid.changed_blocks(root) == [1]
        assert leaf.changed_blocks(leaf) == []
        with pytest.raises(vhd.ChainError):
            root.changed_blocks(leaf)
        assert leaf.changed_blocks(paths[1]) == [3]


def test_unrelated_base_is_refused(tmp_path):
    a, _ = build_chain(
        tmp_path / "a" if (tmp_path / "a").mkdir() is None else None, [Level(2 * MiB)]
    )
    b, _ = build_chain(
        tmp_path / "b" if (tmp_path / "b").mkdir() is None else None, [Level(2 * MiB)]
    )
    with vhd.open_chain(a[0]) as ca, vhd.open_chain(b[0]) as cb:
        with pytest.raises(vhd.ChainError, match="not an ancestor"):
            ca.changed_blocks(cb)


@pytest.mark.parametrize("block_size", [512 * 1024, 64 * 1024, 4096])
def test_small_block_sizes(tmp_path, block_size):
    writes = [(block_size - 512, pattern(1, 1024)), (3 * block_size + 4096, pattern(2, block_size))]
    size = 8 * block_size
    levels = [
        Level(size, writes, block_size=block_size),
        Level(size, [(10, b"abc")], block_size=block_size),
    ]
    paths, models = build_chain(tmp_path, levels)
    with vhd.open_chain(paths[-1]) as c:
        assert c.block_size == block_size
        assert read_all(c) == bytes(models[-1])
        assert c.changed_blocks(paths[0]) == [0]
        for i in range(c.block_count):
            assert c.read_block(i) == bytes(models[-1][i * block_size : (i + 1) * block_size])


def test_raw_parent_null_uuid(tmp_path):
    """The LVM `LV-` case: a differencing VHD whose parent is a raw file (null parent uuid)."""
    levels = [
        Level(4 * MiB, [(MiB, pattern(7, MiB))], raw=True),
        Level(4 * MiB, [(MiB + 4096, b"z" * 8192)]),
    ]
    paths, models = build_chain(tmp_path, levels)
    with vhd.open_chain(paths[1]) as c:
        assert c.depth == 2 and c.files[0].parent_uuid.int == 0
        assert c.files[1].kind == "raw" and c.files[1].uuid is None
        assert read_all(c) == bytes(models[1])
        # a raw level has every sector: no zero extents
        assert all(not e.zero for e in c.extents())
        assert c.block_source(1).kind == "file" and c.block_source(1).file is c.files[1]
        assert c.block_source(0).kind == "assemble"
    # the raw parent can also be passed explicitly, whatever the locators say
    os.rename(paths[0], str(tmp_path / "elsewhere.raw"))
    with pytest.raises(vhd.ChainError):
        vhd.open_chain(paths[1])
    with vhd.open_chain(paths[1], raw_parent=str(tmp_path / "elsewhere.raw")) as c:
        assert read_all(c) == bytes(models[1])


def test_plain_raw_file_is_a_one_level_chain(tmp_path):
    p = tmp_path / "disk.img"
    data = pattern(3, 3 * MiB + 512)
    p.write_bytes(data)
    with vhd.open_chain(str(p)) as c:
        assert c.size == len(data) and c.block_size == 2 * MiB and c.depth == 1
        assert read_all(c) == data
        assert c.block_source(0) == vhd.BlockSource("file", c.files[0], 0, 2 * MiB)
        assert c.block_source(1).kind == "file" and c.block_source(1).length == MiB + 512
        assert c.read_block(1) == data[2 * MiB :]
    with pytest.raises(vhd.VhdError):
        vhd.open_chain(str(p), allow_raw=False)


def test_fixed_vhd(tmp_path, qemu_tools):
    from tests.fixtures.vhd import run

    p = str(tmp_path / "fixed.vhd")
    run(["qemu-img", "create", "-f", "vpc", "-o", "subformat=fixed", p, "4M"])
    run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 64k", p])
    with vhd.open_chain(p) as c:
        f = c.files[0]
        assert f.footer.disk_type == fmt.DISK_FIXED
        data = read_all(c)
        assert data[MiB : MiB + 65536] == b"\x5a" * 65536 and data.count(0) == len(data) - 65536
        assert c.block_source(0).kind == "file"


def test_open_from_fd_with_logical_end(tmp_path):
    """A VHD inside a larger device (LVM): footer in the VHD's last 512 bytes, not the device's."""
    paths, models = build_chain(tmp_path, [Level(4 * MiB, [(MiB, pattern(9, 3 * MiB))])])
    vhd_bytes = open(paths[0], "rb").read()
    dev = tmp_path / "lv"
    dev.write_bytes(vhd_bytes + pattern(10, 3 * MiB + 1234))
    fd = os.open(str(dev), os.O_RDONLY)
    try:
        f = vhd.VhdFile.open(str(dev), fd=fd, end=len(vhd_bytes))
        with vhd.Chain([f]) as c:
            assert read_all(c) == bytes(models[0])
        os.fstat(fd)  # still open: a passed-in fd belongs to the caller
    finally:
        os.close(fd)


def test_resolve_parent_hook(tmp_path):
    levels = [Level(2 * MiB, [(0, b"root")]), Level(2 * MiB, [(512, b"leaf")])]
    paths, models = build_chain(tmp_path, levels)
    moved = str(tmp_path / "moved-parent")
    os.rename(paths[0], moved)
    seen = []

    def resolve(child, locators):
        seen.append((child.path, sorted(code for code, _ in locators)))
        return vhd.VhdFile.open(moved)

    with vhd.open_chain(paths[1], resolve_parent=resolve) as c:
        assert read_all(c) == bytes(models[1])
    assert seen == [(paths[1], ["MacX", "W2ku", "W2ru"])]


def test_locators_are_relative_and_absolute(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(2 * MiB), Level(2 * MiB)])
    with vhd.VhdFile.open(paths[1]) as f:
        locs = dict(f.parent_locators())
        assert locs["W2ku"] == "./level0.vhd" and locs["W2ru"] == "./level0.vhd"
        assert locs["MacX"] == os.path.abspath(paths[0])
        assert f.header.parent_name == "level0.vhd"
    # a relative locator keeps working when the whole directory moves
    new_dir = tmp_path.parent / (tmp_path.name + "-moved")
    os.rename(str(tmp_path), str(new_dir))
    with vhd.open_chain(str(new_dir / "level1.vhd")) as c:
        assert c.depth == 2
    os.rename(str(new_dir), str(tmp_path))


def test_batmap_used_when_valid(tmp_path):
    paths, models = build_chain(
        tmp_path, [Level(6 * MiB, [(0, pattern(1, 2 * MiB)), (2 * MiB, b"q" * 512)])]
    )
    with vhd.VhdFile.open(paths[0]) as f:
        assert f.batmap is not None
        assert f.block_full(0) and not f.block_full(1) and not f.block_full(2)
        assert f.block_bitmap(0) is vhd.file.FULL


def test_fragmented_levels_assemble(tmp_path):
    """Every level holds many fragments of the same block (the span-read path must not let one level's
    over-read clobber another's sectors)."""
    bs = 2 * MiB
    levels = [Level(4 * MiB, [(0, pattern(1, 4 * MiB))])]
    for lvl in range(1, 4):
        writes = [
            (off, pattern(10 * lvl + k, 4096 * lvl))
            for k, off in enumerate(range(lvl * 8192, bs, 3 * 65536))
        ]
        writes += [(bs + 100 * lvl + k * 7000, pattern(20 * lvl + k, 1000)) for k in range(5)]
        levels.append(Level(4 * MiB, writes))
    paths, models = build_chain(tmp_path, levels)
    with vhd.open_chain(paths[-1]) as c:
        assert c.read(0, c.size) == bytes(models[-1])
        for i in range(c.block_count):
            assert c.read_block(i) == bytes(models[-1][i * bs : (i + 1) * bs])
            buf = bytearray(b"\xaa" * bs)
            c.read_into(i * bs, buf)
            assert buf == models[-1][i * bs : (i + 1) * bs]
    # the same with a hole in the root's block: zeros under the fragments
    levels[0] = Level(4 * MiB, [(0, pattern(1, 65536)), (bs, pattern(2, 4096))])
    sub = tmp_path / "holes"
    sub.mkdir()
    paths, models = build_chain(sub, levels)
    with vhd.open_chain(paths[-1]) as c:
        assert c.read(0, c.size) == bytes(models[-1])
        for i in range(c.block_count):
            assert c.read_block(i) == bytes(models[-1][i * bs : (i + 1) * bs])


def test_lvm_presized_bat(tmp_path, qemu_tools):
    """SM sizes an LVM VHD's BAT for 2 TiB: far more entries than current_size needs. Valid, and cheap:
    only the entries that map the disk are read, and extents jump over unallocated runs."""
    p = str(tmp_path / "lvm.vhd")
    with vhd.create_dynamic(p, 10 * MiB, max_table_entries=(2 << 40) // (2 * MiB)) as w:
        w.write(4 * MiB, pattern(1, MiB))
    assert os.path.getsize(p) > 4 * MiB  # the 4 MiB table is really there
    with vhd.open_chain(p) as c:
        f = c.files[0]
        assert f.header.max_table_entries == 1 << 20 and len(f.bat) == 5
        assert f.batmap is not None
        assert c.extents() == [
            vhd.Extent(0, 4 * MiB, True),
            vhd.Extent(4 * MiB, MiB, False),
            vhd.Extent(5 * MiB, 5 * MiB, True),
        ]
        assert c.allocated_blocks() == [2]
    from tests.fixtures.vhd import qemu_raw

    raw = qemu_raw(p, tmp_path)
    assert raw[4 * MiB : 5 * MiB] == pattern(1, MiB) and raw.count(0) == len(raw) - MiB + pattern(
        1, MiB
    ).count(0)


def test_hidden_flag_reported(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(2 * MiB), Level(2 * MiB)])
    with open(paths[0], "r+b") as fh:
        fh.seek(-512, 2)
        footer = fmt.Footer.parse(fh.read(512))
        footer.hidden = 1
        raw = footer.build()
        fh.seek(-512, 2)
        fh.write(raw)
        fh.seek(0)
        fh.write(raw)
    with vhd.open_chain(paths[1]) as c:
        assert [f.hidden for f in c.files] == [0, 1]
        assert c.describe()["files"][1]["hidden"] is True


def test_blktap_01_little_endian_bitmaps_refused(tmp_path):
    paths, _ = build_chain(tmp_path, [Level(2 * MiB)])
    with open(paths[0], "r+b") as fh:
        fh.seek(-512, 2)
        footer = fmt.Footer.parse(fh.read(512))
        footer.creator_version = 1
        raw = footer.build()
        fh.seek(-512, 2)
        fh.write(raw)
        fh.seek(0)
        fh.write(raw)
    with pytest.raises(vhd.UnsupportedVhd, match="little-endian"):
        vhd.open_chain(paths[0])


@pytest.mark.timeout(120)
def test_large_sparse_disk(tmp_path):
    """A 2000 GiB dynamic disk with two blocks: extents and allocated_blocks jump over the empty BAT
    (the timeout is the hang guard; no speed is asserted)."""
    p = str(tmp_path / "big.vhd")
    size = 2000 * (1 << 30)
    with vhd.create_dynamic(p, size) as w:
        w.write(0, b"a" * 512)
        w.write(size - 512, b"z" * 512)
    with vhd.open_chain(p) as c:
        ext = c.extents()
        assert ext[0] == vhd.Extent(0, 512, False) and ext[-1] == vhd.Extent(size - 512, 512, False)
        assert len(ext) == 3
        assert c.allocated_blocks() == [0, c.block_count - 1]
        assert c.read(size - 1024, 1024) == bytes(512) + b"z" * 512


def test_chain_of_vhds_inside_larger_devices(tmp_path):
    """The LVM SR's shape: each VHD lives at the start of a bigger 'device' (here a file standing in for
    an LV; real LVs need device-mapper, absent on these machines), footer in the VHD's last 512 bytes.
    The resolve_parent hook hands over opened levels whose fds the chain then owns."""
    levels = [Level(4 * MiB, [(0, pattern(1, 4 * MiB))]), Level(4 * MiB, [(MiB, pattern(2, 8192))])]
    paths, models = build_chain(tmp_path, levels)
    devices = {}
    for p in paths:
        data = open(p, "rb").read()
        dev = p + ".lv"
        with open(dev, "wb") as f:
            f.write(data + pattern(3, 2 * MiB + 512))  # junk after the VHD, like an inflated LV
        devices[os.path.basename(p)] = (dev, len(data))
    opened = []

    def resolve(child, locators):
        name = child.header.parent_name
        dev, end = devices[name]
        fd = os.open(dev, os.O_RDONLY)
        opened.append(fd)
        return vhd.VhdFile.open(dev, fd=fd, end=end, own_fd=True)

    dev, end = devices["level1.vhd"]
    fd = os.open(dev, os.O_RDONLY)
    leaf = vhd.VhdFile.open(dev, fd=fd, end=end, own_fd=True)
    with vhd.Chain([leaf]) as c0:
        assert c0.size == 4 * MiB
    with pytest.raises(OSError):
        os.fstat(fd)  # owned: closed with the chain
    fd = os.open(dev, os.O_RDONLY)
    with vhd.open_chain(dev, fd=fd, end=end, resolve_parent=resolve) as c:
        assert c.depth == 2 and c.read(0, c.size) == bytes(models[1])
    os.fstat(fd)  # the leaf's fd was passed without own_fd: still the caller's
    os.close(fd)
    for pfd in opened:
        with pytest.raises(OSError):
            os.fstat(pfd)


def test_parent_in_another_directory(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "snap").mkdir()
    root = str(tmp_path / "base" / "root.vhd")
    with vhd.create_dynamic(root, 2 * MiB) as w:
        w.write(0, b"r" * 4096)
    leaf = str(tmp_path / "snap" / "leaf.vhd")
    with vhd.create_differencing(leaf, root) as w:
        w.write(512, b"l" * 512)
    with vhd.VhdFile.open(leaf) as f:
        # like blktap, W2ru/W2ku paths are written ".\\<relative path>"
        assert os.path.normpath(dict(f.parent_locators())["W2ru"]) == "../base/root.vhd"
    with vhd.open_chain(leaf) as c:
        assert c.read(0, 1536) == b"r" * 512 + b"l" * 512 + b"r" * 512


def test_differencing_stream_over_a_raw_parent(tmp_path):
    raw = tmp_path / "LV-base"
    raw.write_bytes(pattern(5, 4 * MiB))
    layout = vhd.VhdStreamLayout(4 * MiB, [1], parent=(None, "LV-base"))
    out = tmp_path / "delta.vhd"
    block = pattern(6, 2 * MiB)
    with open(str(out), "wb") as f:
        for piece in layout.chunks(lambda i: block):
            f.write(piece)
    assert out.stat().st_size == layout.total_length
    with vhd.open_chain(str(out)) as c:
        assert c.files[0].parent_uuid.int == 0 and c.files[1].kind == "raw"
        assert c.read(0, c.size) == pattern(5, 4 * MiB)[: 2 * MiB] + block
