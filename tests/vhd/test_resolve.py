"""The block-at-a-time resolution (speedups.block_runs per block) against the level-by-level one it
replaces on the hot path, and read_block_into / the pooled assembly buffers against the model.

SectorMap.runs (agent.vhd.resolve) takes the block path below fast_limit (levels on one grid,
every level big enough) and the level path past it; both must give the same runs (and presence the
same zeros), and the block_source shortcut must agree with the runs. The bytes themselves are judged
by the models (and, for the fixed root, by qemu-img).
"""

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import vhd
from agent.vhd import chain as chain_mod
from agent.vhd.chain import BlockSource
from tests.fixtures.vhd import Level, MiB, build_chain, pattern, qemu_raw, run
from tests.vhd.test_properties import chains

SECTOR = 512


def presence(runs):
    out = []
    for s, n, li, _where in runs:
        if out and out[-1][2] == (li is None):
            out[-1] = (out[-1][0], out[-1][1] + n, li is None)
        else:
            out.append((s, n, li is None))
    return out


def check_resolution(chain, model, ranges=()):
    nsec = (chain.size + SECTOR - 1) // SECTOR
    for first, count in [(0, nsec)] + list(ranges):
        slow = chain._map.level_runs(first, count)
        assert chain._map.runs(first, count) == slow, (first, count)
        assert chain._map.presence(first, count) == presence(slow), (first, count)
    bs = chain.block_size
    dirty = bytearray(b"\xa5" * (bs + 100))
    for i in range(chain.block_count):
        start = i * bs
        length = min(bs, chain.size - start)
        n = (length + SECTOR - 1) // SECTOR
        assert chain.block_source(i) == chain._block_source_runs(start, length, n), i
        block = bytes(model[start : start + length])
        assert chain.read_block_into(i, dirty) == length
        assert dirty[:length] == block
        assert dirty[length:] == b"\xa5" * (len(dirty) - length)  # past the block: untouched
        dirty[:length] = b"\xa5" * length
        assert chain.read_block(i) == block
        assert chain.read(start, length) == block


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(levels=chains(), cuts=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=8))
def test_block_resolution_matches_level_resolution(levels, cuts):
    d = tempfile.mkdtemp(prefix="vhdres")
    try:
        paths, models = build_chain(d, levels)
        with vhd.open_chain(paths[-1]) as chain:
            nsec = (chain.size + SECTOR - 1) // SECTOR
            ranges = []
            for a, b in cuts:
                first = min(int(a * nsec), nsec - 1)
                ranges.append((first, max(1, int(b * (nsec - first)))))
            check_resolution(chain, models[-1], ranges)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_grown_leaf_splits_between_block_and_level_paths(tmp_path):
    """A leaf resized above its parents: sectors below the parents' size take the block path, the
    rest the level path (zeros past each parent's size), and the runs join seamlessly."""
    levels = [
        Level(3 * MiB, [(0, pattern(1, 3 * MiB))]),
        Level(5 * MiB + 1024, [(2 * MiB + 4096, pattern(2, 8192)), (4 * MiB, pattern(3, 512))]),
        Level(9 * MiB, [(3 * MiB - 512, pattern(4, 1024)), (8 * MiB, pattern(5, 4096))]),
    ]
    paths, models = build_chain(tmp_path, levels)
    with vhd.open_chain(paths[-1]) as c:
        assert 0 < c._map.fast_limit < c.size // SECTOR
        lim = c._map.fast_limit
        check_resolution(c, models[-1], [(lim - 8, 16), (lim - 1, 1), (0, lim + 1), (lim, 100)])
        assert c.read(0, c.size) == bytes(models[-1])


def test_fixed_root_under_differencing_children(tmp_path, qemu_tools):
    """A fixed VHD (written by qemu) as the root: its blocks fill the gaps between the children's
    allocated blocks, contiguous across blocks."""
    root = str(tmp_path / "root.vhd")
    run(["qemu-img", "create", "-f", "vpc", "-o", "subformat=fixed", root, "8M"])
    run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 3M", root])
    model = bytearray(qemu_raw(root, tmp_path))
    mid = str(tmp_path / "mid.vhd")
    leaf = str(tmp_path / "leaf.vhd")
    with vhd.create_differencing(mid, root) as w:
        for off, data in ((2 * MiB + 512, pattern(1, 4096)), (4 * MiB, pattern(2, 2 * MiB))):
            w.write(off, data)
            model[off : off + len(data)] = data
    with vhd.create_differencing(leaf, mid) as w:
        for off, data in ((2 * MiB, pattern(3, 1024)), (4 * MiB + 8192, pattern(4, 512))):
            w.write(off, data)
            model[off : off + len(data)] = data
    with vhd.open_chain(leaf) as c:
        assert c.depth == 3 and c._map.full == 2 and c.size == len(model)
        nsec = c.size // SECTOR
        check_resolution(c, model, [(1, nsec - 2), (4096, 8192), (10, 3)])
        runs = c._map.runs(0, nsec)
        assert runs[0] == (0, 4096, 2, 0)  # the root's first two blocks: one run, one read
        assert c.block_source(0) == BlockSource("file", c.files[2], 0, 2 * MiB)
        assert c.block_source(1).kind == "assemble"
        assert c.read(0, c.size) == bytes(model)
        assert [e.zero for e in c.extents()] == [False]


def test_read_block_into_refuses_small_or_readonly_buffers(tmp_path):
    paths, models = build_chain(tmp_path, [Level(3 * MiB, [(MiB, pattern(1, MiB))])])
    with vhd.open_chain(paths[0]) as c:
        with pytest.raises(ValueError):
            c.read_block_into(0, bytearray(2 * MiB - 1))
        with pytest.raises(ValueError):
            c.read_block_into(0, bytes(2 * MiB))
        with pytest.raises(ValueError):
            c.read_block_into(2, bytearray(2 * MiB))  # block 2 does not exist
        buf = bytearray(b"\x01" * MiB)  # the last block is 1 MiB: a 1 MiB buffer is enough
        assert c.read_block_into(1, buf) == MiB and buf == models[0][2 * MiB :]
        assert c.read_block_into(0, memoryview(bytearray(2 * MiB))) == 2 * MiB


def test_odd_sized_raw_leaf_block_into(tmp_path):
    """A raw leaf whose size is not a multiple of 512: the last block's last sector is partial."""
    data = pattern(7, 2 * MiB + 700)
    p = tmp_path / "disk.raw"
    p.write_bytes(data)
    with vhd.open_chain(str(p)) as c:
        buf = bytearray(b"\xff" * (2 * MiB))
        assert c.read_block_into(1, buf) == 700 and bytes(buf[:700]) == data[2 * MiB :]
        assert c.read_block(1) == data[2 * MiB :]
        assert c.read(2 * MiB - 100, 800) == data[2 * MiB - 100 :]


def test_pooled_buffers_are_bounded_and_reused_concurrently(tmp_path):
    import threading

    writes = [(i * 2 * MiB + 4096 * i, pattern(i, 8192)) for i in range(4)]
    levels = [Level(8 * MiB, [(0, pattern(9, 8 * MiB))]), Level(8 * MiB, writes)]
    paths, models = build_chain(tmp_path, levels)
    errors = []
    with vhd.open_chain(paths[-1]) as c:
        assert all(c.block_source(i).kind == "assemble" for i in range(4))

        def reader(k):
            try:
                for r in range(30):
                    i = (k + r) % 4
                    if c.read_block(i) != bytes(models[-1][i * 2 * MiB : (i + 1) * 2 * MiB]):
                        errors.append((k, i))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert chain_mod._pool_held[0] <= chain_mod.POOL_BYTES
        assert chain_mod._pool_held[0] == sum(len(b) for v in chain_mod._pool.values() for b in v)
        assert 2 * MiB in chain_mod._pool  # the buffers came back for the next reader


def test_big_blocks_are_not_pooled(tmp_path, monkeypatch):
    """A block size above the pool's cap: each read gets a buffer of the size it needs."""
    monkeypatch.setattr(chain_mod, "POOL_MAX_BUFFER", 64 * 1024)
    levels = [
        Level(MiB, [(0, pattern(1, MiB))], block_size=128 * 1024),
        Level(
            MiB, [(4096, pattern(2, 700)), (300 * 1024, pattern(3, 5000))], block_size=128 * 1024
        ),
    ]
    paths, models = build_chain(tmp_path, levels)
    held = {k: len(v) for k, v in chain_mod._pool.items()}
    with vhd.open_chain(paths[-1]) as c:
        assert c.block_source(0).kind == "assemble"
        check_resolution(c, models[-1])
        assert c.read(4000, 10) == bytes(models[-1][4000:4010])
    assert 128 * 1024 not in chain_mod._pool
    assert {k: len(v) for k, v in chain_mod._pool.items()} == held


def test_file_truncated_after_open_raises_typed_errors(tmp_path):
    """A leaf cut short after the chain was opened (the BAT was checked at open): bitmap reads come
    up short. Every entry point of the block path raises CorruptVhd naming the file, never a
    short buffer or another exception."""
    levels = [
        Level(6 * MiB, [(0, pattern(1, 6 * MiB))]),
        Level(6 * MiB, [(2 * MiB + 4096, pattern(2, 8192)), (4 * MiB, pattern(3, 512))]),
    ]
    paths, models = build_chain(tmp_path, levels)
    with vhd.open_chain(paths[-1]) as c:
        f = c.files[0]
        cut = f.bat[1] * SECTOR  # the leaf's first allocated block starts here
        os.truncate(paths[-1], cut)
        assert c.block_source(0).kind == "file"  # not in the leaf: the root answers alone
        calls = [
            lambda: c.block_source(1),
            lambda: c.extents(),
            lambda: c.read_block(1),
            lambda: c.read_block_into(2, bytearray(2 * MiB)),
            lambda: c.read(2 * MiB, 4096),
        ]
        for call in calls:
            with pytest.raises(vhd.CorruptVhd) as info:
                call()
            assert paths[-1] in str(info.value)
