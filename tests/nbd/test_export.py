"""agent.export and agent.sr on real chains written by our VHD writer (models are the oracle: they
are computed from the writes, not read back) and on qemu-made VHDs (qemu-img convert is the oracle)."""

import os

import pytest

from agent import sr as sr_mod
from agent.export import BYTES, HOLE, SENDFILE, Counters, Export, ExportError
from tests.fixtures.nbd import qemu_raw_bytes
from tests.fixtures.vhd import Level, pattern

MiB = 1 << 20
BS = 2 * MiB


def three_level(file_sr):
    """root: blocks 0,1 full; mid: block 1 partly, block 3 full; leaf: block 0 full, 4 partly."""
    size = 6 * BS
    levels = [
        Level(size, [(0, pattern(1, 2 * BS))]),
        Level(size, [(BS + 4096, pattern(2, 8192)), (3 * BS, pattern(3, BS))]),
        Level(size, [(0, pattern(4, BS)), (4 * BS + 512, pattern(5, 1024))]),
    ]
    return file_sr.chain(levels)


def open_export(file_sr, vdi, base=None, counters=None):
    return sr_mod.FileSR([file_sr.root]).open_export(vdi, file_sr.sr, base, counters=counters)


def test_plan_read_kinds_per_block(file_sr):
    vdis, models = three_level(file_sr)
    with open_export(file_sr, vdis[-1]) as export:
        kinds = [export.plan_read(i * BS, BS)[0][0] for i in range(6)]
        # block 0: whole in leaf; 1: root + mid sectors; 2: nowhere; 3: whole in mid;
        # 4: leaf sectors over nothing (qualifies as assembled); 5: nowhere
        assert kinds == [SENDFILE, BYTES, HOLE, SENDFILE, BYTES, HOLE]
        assert export.read(0, 6 * BS) == bytes(models[-1])
        # A partial range inside a 'file' block is still sendfile, at the right file offset.
        (piece,) = export.plan_read(BS // 2 + 7, 1000)
        assert piece[0] == SENDFILE
        assert os.pread(piece[1], piece[3], piece[2]) == bytes(
            models[-1][BS // 2 + 7 : BS // 2 + 1007]
        )


def test_plan_read_spanning_blocks_matches_model(file_sr):
    vdis, models = three_level(file_sr)
    with open_export(file_sr, vdis[-1]) as export:
        for off, length in [(0, 6 * BS), (BS - 1, 3), (BS + 4000, BS), (5 * BS - 10, 10 + BS)]:
            assert export.read(off, length) == bytes(models[-1][off : off + length])
            pieces = export.plan_read(off, length)
            total = sum(
                p[1] if p[0] == HOLE else len(p[1]) if p[0] == BYTES else p[3] for p in pieces
            )
            assert total == length


def test_out_of_range(file_sr):
    vdis, _ = three_level(file_sr)
    with open_export(file_sr, vdis[-1]) as export:
        with pytest.raises(ExportError):
            export.plan_read(6 * BS - 1, 2)
        with pytest.raises(ExportError):
            export.extents(0, 6 * BS + 1)


def test_extents_and_changed(file_sr):
    vdis, models = three_level(file_sr)
    with open_export(file_sr, vdis[-1]) as export:
        data = [(o, n) for o, n, kind in export.extents() if kind == "data"]
        # every non-zero byte lies in a data extent
        model = models[-1]
        covered = bytearray(len(model))
        for o, n in data:
            covered[o : o + n] = b"\1" * n
        assert all(covered[i] for i in range(0, len(model), 512) if any(model[i : i + 512]))
        # no base: changed == allocated blocks
        assert export.changed_blocks() == [0, 1, 3, 4]
        assert export.changed(BS, 3 * BS) == [
            (BS, BS, True),
            (2 * BS, BS, False),
            (3 * BS, BS, True),
        ]
    with open_export(file_sr, vdis[-1], base=vdis[1]) as export:
        assert export.changed_blocks() == [0, 4]
        assert export.changed() == [
            (0, BS, True),
            (BS, 3 * BS, False),
            (4 * BS, BS, True),
            (5 * BS, BS, False),
        ]


def test_base_must_be_an_ancestor(file_sr):
    vdis, _ = three_level(file_sr)
    other = file_sr.qemu_vdi(4 * MiB)
    with pytest.raises(Exception, match="ancestor|ancestry"):
        open_export(file_sr, vdis[-1], base=other)


def test_qemu_vhd_reads_like_qemu(file_sr, tmp_path):
    vdi = file_sr.qemu_vdi(10 * MiB, [(0, 3 * MiB, 0x41), (5 * MiB + 4096, 8192, 0x42)])
    with open_export(file_sr, vdi) as export:
        assert export.read(0, export.size) == qemu_raw_bytes(file_sr.path(vdi), tmp_path)


def test_counters_are_thread_safe_sums():
    import threading

    c = Counters()

    def work():
        for _ in range(1000):
            c.record("sendfile", 10)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = c.snapshot()
    assert snap["sendfile_pieces"] == 4000 and snap["sendfile_bytes"] == 40000


class _FakeFile(object):
    path = "/fake"

    def __init__(self, fd):
        self._fd = fd

    def fileno(self):
        return self._fd


def test_short_file_source_is_refused():
    """A 'file' source shorter than the range asked of it is an ExportError, not a short send."""
    from agent.vhd import BlockSource, Extent

    class Chain(object):
        size = 4 * MiB
        block_size = BS
        block_count = 2
        files = ()

        def block_source(self, i):
            return BlockSource("file", _FakeFile(0), 0, 100)

        def extents(self, o, n):
            return [Extent(o, n, False)]

        def close(self):
            pass

    export = Export(Chain())
    with pytest.raises(ExportError, match="source"):
        export.plan_read(0, 4096)


def test_concurrent_reads_of_split_blocks(file_sr):
    """Assembly runs without an export-wide lock: many threads, random ranges, all correct."""
    import random
    import threading

    vdis, models = three_level(file_sr)
    model = bytes(models[-1])
    errors = []
    with open_export(file_sr, vdis[-1]) as export:

        def work(seed):
            rng = random.Random(seed)
            try:
                for _ in range(60):
                    off = rng.randrange(export.size)
                    n = rng.randint(1, min(3 * BS, export.size - off))
                    if export.read(off, n) != model[off : off + n]:
                        errors.append((off, n))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert errors == []
