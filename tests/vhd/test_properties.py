"""Property tests: random writes into random chains (depth 1-4, parents smaller or larger than children,
block sizes from 2 MiB down to 4 KiB, raw roots) against a bytearray model and a sector-allocation
model, for read, read_block, block_source, extents, changed_blocks and the streaming writer."""

import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import vhd
from tests.fixtures.vhd import Level, MiB, build_chain

SECTOR = 512
BLOCK_SIZES = [2 * MiB, 512 * 1024, 64 * 1024, 4096]


@st.composite
def chains(draw):
    depth = draw(st.integers(1, 4))
    chain_bs = draw(st.sampled_from(BLOCK_SIZES))
    mixed = draw(st.booleans()) and draw(
        st.booleans()
    )  # now and then, levels with other block sizes
    raw_root = depth > 1 and draw(st.integers(0, 4)) == 0
    max_blocks = 5 if chain_bs == 2 * MiB else 12
    levels = []
    for d in range(depth):
        bs = draw(st.sampled_from(BLOCK_SIZES)) if mixed else chain_bs
        size = draw(
            st.one_of(
                st.integers(1, max_blocks * chain_bs // SECTOR).map(lambda n: n * SECTOR),
                st.integers(1, max_blocks).map(lambda n: n * chain_bs),
            )
        )
        writes = []
        for _ in range(draw(st.integers(0, 10))):
            kind = draw(st.integers(0, 5))
            if kind >= 4:
                # small scattered writes: fragments that several levels share inside one block
                off = draw(st.integers(0, size - 1))
                length = draw(st.integers(1, min(size - off, 8192)))
            elif kind == 0:
                # a whole aligned block of the chain grid (exercises 'file' sources and batmap bits)
                b = draw(st.integers(0, max(0, (size - 1) // chain_bs)))
                off = b * chain_bs
                length = min(chain_bs, size - off)
            else:
                off = draw(st.integers(0, size - 1))
                length = draw(st.integers(1, min(size - off, 3 * chain_bs)))
            seed = draw(st.integers(0, 1 << 30))
            writes.append((off, _bytes(seed, length)))
        levels.append(Level(size, writes, block_size=bs, raw=(d == 0 and raw_root)))
    return levels


def _bytes(seed, length):
    import random

    return random.Random(seed).randbytes(length)


def alloc_models(levels):
    """Per level (root first): bytearray, one flag per sector of that level's size: does any file have it."""
    out = []
    parent = None
    for lv in levels:
        nsec = (lv.size + SECTOR - 1) // SECTOR
        flags = bytearray(nsec)
        if lv.raw:
            flags[:] = b"\x01" * nsec
        if parent is not None:
            n = min(len(parent), nsec)
            flags[:n] = parent[:n]
        for off, data in lv.writes:
            a, b = off // SECTOR, (off + len(data) + SECTOR - 1) // SECTOR
            flags[a:b] = b"\x01" * (b - a)
        out.append(flags)
        parent = flags
    return out


def expected_extents(flags, size):
    out = []
    for s, f in enumerate(flags):
        a, b = s * SECTOR, min((s + 1) * SECTOR, size)
        zero = not f
        if out and out[-1][2] == zero:
            out[-1] = (out[-1][0], out[-1][1] + b - a, zero)
        else:
            out.append((a, b - a, zero))
    return [vhd.Extent(*e) for e in out]


def expected_changed(levels, k, leaf_bs, leaf_blocks):
    """Blocks (leaf grid) allocated in a file above level k (root-first index)."""
    changed = set()
    for lv in levels[k + 1 :]:
        bs = lv.block_size
        own = set()
        for off, data in lv.writes:
            own.update(range(off // bs, (off + len(data) - 1) // bs + 1))
        for b in own:
            first, last = b * bs // leaf_bs, ((b + 1) * bs - 1) // leaf_bs
            changed.update(i for i in range(first, last + 1) if i < leaf_blocks)
    return sorted(changed)


def check_chain(chain, model, flags):
    size = chain.size
    assert size == len(model)
    data = chain.read(0, size)
    assert data == bytes(model)
    assert chain.extents() == expected_extents(flags, size)
    bs = chain.block_size
    reused = bytearray(b"\xaa" * bs)  # a dirty, reused buffer: holes must be zeroed by read_into
    for i in range(chain.block_count):
        start = i * bs
        block = bytes(model[start : start + bs])
        assert chain.read_block(i) == block
        view = memoryview(reused)[: len(block)]
        chain.read_into(start, view)
        assert view == block
        src = chain.block_source(i)
        assert src.length == len(block)
        nsec_flags = flags[start // SECTOR : (start + len(block) + SECTOR - 1) // SECTOR]
        if src.kind == "zero":
            assert not any(nsec_flags) and block.count(0) == len(block)
        elif src.kind == "file":
            assert all(nsec_flags)
            assert os.pread(src.file.fileno(), src.length, src.offset) == block
        else:
            assert src.kind == "assemble" and any(nsec_flags)
    return data


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    levels=chains(), probes=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 100000)), max_size=6)
)
def test_random_chains_match_model(levels, probes):
    d = tempfile.mkdtemp(prefix="vhdprop")
    try:
        paths, models = build_chain(d, levels)
        flags = alloc_models(levels)
        with vhd.open_chain(paths[-1]) as chain:
            assert chain.depth == len(levels)
            check_chain(chain, models[-1], flags[-1])
            size = chain.size
            for frac, ln in probes:
                off = min(int(frac * size), size - 1)
                ln = min(ln, size - off)
                assert chain.read(off, ln) == bytes(models[-1][off : off + ln])
            # changed_blocks against every VHD ancestor
            for k in range(len(levels) - 1):
                if levels[k].raw:
                    continue
                with vhd.open_chain(paths[k]) as base:
                    assert chain.changed_blocks(base) == expected_changed(
                        levels, k, chain.block_size, chain.block_count
                    )
            # the streaming writer: a full dynamic VHD of the chain, parsed back
            blocks = [i for i in range(chain.block_count) if chain.block_source(i).kind != "zero"]
            stream = vhd.stream_vhd(
                chain.size, blocks, chain.read_block, block_size=chain.block_size
            )
            full = b"".join(stream)
            assert len(full) == stream.total_length
            out = os.path.join(d, "stream.vhd")
            with open(out, "wb") as f:
                f.write(full)
            with vhd.open_chain(out) as back:
                assert back.depth == 1 and back.read(0, back.size) == bytes(models[-1])
                assert [e.zero for e in back.extents()].count(False) <= len(blocks)
            # and an incremental (differencing) stream on top of the nearest VHD ancestor
            k = len(levels) - 2
            if k >= 0 and not levels[k].raw:
                with vhd.open_chain(paths[k]) as base:
                    changed = chain.changed_blocks(base)
                    parent = (base.files[0].uuid, os.path.basename(paths[k]))
                    inc = vhd.stream_vhd(
                        chain.size,
                        changed,
                        chain.read_block,
                        block_size=chain.block_size,
                        parent=parent,
                    )
                    incr = os.path.join(d, "incr.vhd")
                    with open(incr, "wb") as f:
                        for piece in inc:
                            f.write(piece)
                    assert os.path.getsize(incr) == inc.total_length
                with vhd.open_chain(incr) as back:
                    assert back.depth == len(levels)
                    assert back.read(0, back.size) == bytes(models[-1])
    finally:
        shutil.rmtree(d)


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(1, 40 * 128).map(lambda n: n * 512),
    block_size=st.sampled_from([64 * 1024, 512 * 1024, 2 * MiB]),
    seed=st.integers(0, 1000),
)
def test_stream_layout_offsets(size, block_size, seed):
    import random

    rng = random.Random(seed)
    count = (size + block_size - 1) // block_size
    blocks = sorted(rng.sample(range(count), rng.randint(0, count)))
    layout = vhd.VhdStreamLayout(size, blocks, block_size=block_size)
    prefix = layout.prefix_bytes()
    pos = len(prefix)
    for b in blocks:
        assert layout.block_offset(b) == pos
        assert layout.data_offset(b) % 4096 == 0
        assert len(layout.bitmap_bytes(b)) == layout.bitmap_size
        pos += layout.bitmap_size + block_size + layout.gap
    assert layout.footer_offset == pos
    assert layout.total_length == pos + 512 == pos + len(layout.suffix_bytes())
