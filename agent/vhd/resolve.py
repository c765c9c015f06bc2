"""Which level of a chain supplies each guest sector, and from where in its file.

What lives here: SectorMap, built by agent.vhd.chain.Chain over its levels (leaf first). It answers:

- runs(first, count): (start sector, sectors, level index or None, file offset) covering the
  sectors, sorted and maximal (adjacent runs of one level with contiguous file offsets are merged);
  level None: no level has the sectors (they read as zeros). What Chain reads.
- presence(first, count): (start sector, sectors, zero), the same without levels and offsets,
  adjacent runs merged. What Chain.extents reports.

Two ways to answer, with the same results (tests/vhd/test_resolve.py holds them to it):

- Block by block, the hot path, for the sectors below fast_limit when every level is on the leaf's
  block grid (fast_limit: the smallest level size, so no level reads as zeros past its end). The
  levels that can supply sectors are the dynamic ones down to the first level that has every sector
  (a fixed VHD or a raw file: `full`), if any. One walk, _walk, serves both questions: it goes over
  the blocks some dynamic level holds, and for each the levels that hold it (leaf first, down to
  the first with every sector of the block), and over the stretches between those blocks, which come
  whole from the full level or are zeros. runs derives speedups.block_runs from the walk's bitmaps,
  presence their union (bitmap_claim, bitmap_runs).
- Level by level (level_runs), for any grids and sizes: each level answers sectors_present for what
  the levels above it left pending. Used past fast_limit, and as the reference for the block path.

Chain.block_source asks a third question of the same levels (the first level with any sector of one
block) and walks them itself: it stops at that level, and it runs once per block served.
"""

import bisect

from agent import speedups
from agent.vhd.file import BEYOND, FULL, SECTOR


def _merge_run(out, run):
    """Append run (start, sectors, level, offset) to out, or grow out's last run when run continues
    it: same level, adjacent sectors, contiguous file offsets (zeros have no offset)."""
    if out:
        p = out[-1]
        if (
            p[2] == run[2]
            and p[0] + p[1] == run[0]
            and (p[2] is None or p[3] + p[1] * SECTOR == run[3])
        ):
            out[-1] = (p[0], p[1] + run[1], p[2], p[3])
            return
    out.append(run)


def _merge_presence(out, run):
    """Append run (start, sectors, zero) to out, or grow out's last run when it has the same kind
    (runs arrive in order, each starting where the last ended)."""
    if out and out[-1][2] == run[2]:
        p = out[-1]
        out[-1] = (p[0], p[1] + run[1], run[2])
    else:
        out.append(run)


class SectorMap(object):
    """Runs and presence of the sectors of a leaf-first list of levels (see the module docs)."""

    def __init__(self, files):
        self.files = list(files)
        self.block_size = self.files[0].block_size
        self.same_grid = all(
            f.block_size == self.block_size or not f.is_vhd or f.bat is None for f in self.files
        )
        self.full = None  # index of the first level that has every sector (fixed VHD or raw)
        for i, f in enumerate(self.files):
            if not f.is_vhd or f.bat is None:
                self.full = i
                break
        self.levels = self.files if self.full is None else self.files[: self.full + 1]
        self.fast_limit = -1
        if self.same_grid:
            self.fast_limit = min(f.size_sectors for f in self.levels)
        self._spb = self.block_size // SECTOR
        self._ones = b"\xff" * ((self._spb + 7) // 8)
        self._dyn_blocks = None  # sorted union of the dynamic levels' allocated blocks (lazy)

    # -- the block path's walk ------------------------------------------------------------------------

    def _allocated_above_full(self):
        blocks = self._dyn_blocks
        if blocks is None:
            dyn = self.levels if self.full is None else self.levels[:-1]
            if len(dyn) == 1:
                blocks = dyn[0].allocated_blocks()
            else:
                found = set()
                for f in dyn:
                    found.update(f.allocated_blocks())
                blocks = sorted(found)
            self._dyn_blocks = blocks
        return blocks

    def _walk(self, first, end):
        """Sectors [first, end) below fast_limit in order, as (start, stop, block, held).

        block: the index of the one block [start, stop) lies in when some dynamic level holds that
        block, with held = [(level index, level, bitmap)] of the levels that hold it, leaf first,
        down to the first whose bitmap is FULL (the full level, or a block its batmap marks full).
        block None (and held None): a stretch of any number of blocks that no dynamic level holds."""
        spb = self._spb
        levels = self.levels
        full = self.full
        blocks = self._allocated_above_full()
        nblocks = len(blocks)
        k = bisect.bisect_left(blocks, first // spb)
        pos = first
        while pos < end:
            nxt = blocks[k] * spb if k < nblocks else end
            if nxt > pos:
                stop = min(nxt, end)
                yield pos, stop, None, None
            else:
                b = blocks[k]
                k += 1
                stop = min(b * spb + spb, end)
                held = []
                for li, level in enumerate(levels):
                    if li == full:
                        held.append((li, level, FULL))
                        break
                    bm = level.block_bitmap(b)
                    if bm is not None:
                        held.append((li, level, bm))
                        if bm is FULL:
                            break
                yield pos, stop, b, held
            pos = stop

    # -- runs ----------------------------------------------------------------------------------------

    def runs(self, first, count):
        """Runs (start sector, sectors, level index or None, file offset) covering [first,
        first + count), sorted, maximal."""
        end = first + count
        lim = self.fast_limit
        if end <= lim:
            return self._block_path_runs(first, end)
        if first >= lim:
            return self.level_runs(first, count)
        out = self._block_path_runs(first, lim)
        rest = self.level_runs(lim, end - lim)
        if rest:
            _merge_run(out, rest[0])
            out.extend(rest[1:])
        return out

    def _block_path_runs(self, first, end):
        out = []
        full = self.full
        spb = self._spb
        bsize = self.block_size
        ones = self._ones
        block_runs = speedups.block_runs
        for pos, stop, b, held in self._walk(first, end):
            n = stop - pos
            if b is None or not held:  # the full level's sectors at the same offsets, or zeros
                if full is None:
                    _merge_run(out, (pos, n, None, 0))
                else:
                    _merge_run(out, (pos, n, full, pos * SECTOR))
                continue
            bstart = b * spb
            s0 = pos - bstart
            li, level, bm = held[0]
            if bm is FULL:  # the first level that holds the block has all of it
                off = b * bsize if li == full else level.block_data_offset(b)
                _merge_run(out, (pos, n, li, off + s0 * SECTOR))
                continue
            bitmaps = []
            offsets = []
            for li, level, bm in held:
                bitmaps.append(ones if bm is FULL else bm)
                offsets.append(b * bsize if li == full else level.block_data_offset(b))
            # One block's runs are maximal already: only the first can continue the run before it.
            first_run = True
            for s, ln, k in block_runs(bitmaps, s0, n):
                if k < 0:
                    run = (bstart + s, ln, None, 0)
                else:
                    run = (bstart + s, ln, held[k][0], offsets[k] + s * SECTOR)
                if first_run:
                    _merge_run(out, run)
                    first_run = False
                else:
                    out.append(run)
        return out

    def level_runs(self, first, count):
        """runs() level by level (any grids and sizes): each level answers sectors_present for what
        the levels above it left pending."""
        out = []
        pending = [(first, count)]
        for li, level in enumerate(self.files):
            nxt = []
            for s, n in pending:
                for rs, rn, where in level.sectors_present(s, n):
                    if where is None:
                        if nxt and nxt[-1][0] + nxt[-1][1] == rs:
                            nxt[-1] = (nxt[-1][0], nxt[-1][1] + rn)
                        else:
                            nxt.append((rs, rn))
                    elif where == BEYOND:
                        out.append((rs, rn, None, 0))
                    else:
                        out.append((rs, rn, li, where))
            pending = nxt
            if not pending:
                break
        for s, n in pending:
            out.append((s, n, None, 0))
        if len(out) > 1:
            out.sort(key=lambda r: r[0])
            merged = []
            for r in out:
                _merge_run(merged, r)
            out = merged
        return out

    # -- presence ------------------------------------------------------------------------------------

    def presence(self, first, count):
        """Runs (start sector, sectors, zero) covering [first, first + count), adjacent runs merged:
        zero where no level has the sectors."""
        out = []
        end = first + count
        lim = self.fast_limit
        if first < lim:
            self._block_path_presence(first, min(end, lim), out)
        if end > lim:
            s = max(first, lim)
            for rs, rn, li, _where in self.level_runs(s, end - s):
                _merge_presence(out, (rs, rn, li is None))
        return out

    def _block_path_presence(self, first, end, out):
        if self.full is not None:
            out.append((first, end - first, False))  # a fixed or raw level has every sector
            return
        spb = self._spb
        nbytes = len(self._ones)
        for pos, stop, b, held in self._walk(first, end):
            n = stop - pos
            if b is None or not held:
                runs = ((pos, n, True),)
            elif held[-1][2] is FULL:
                runs = ((pos, n, False),)
            else:
                union = held[0][2]
                if len(held) > 1:
                    union = bytearray(union[:nbytes])
                    for _li, _level, bm in held[1:]:
                        speedups.bitmap_claim(bm, union)  # union |= bm
                bstart = b * spb
                runs = [
                    (bstart + rs, rn, not isset)
                    for rs, rn, isset in speedups.bitmap_runs(union, pos - bstart, n)
                ]
            # One block's runs alternate already: only the first can continue the run before it.
            run = runs[0]
            if out and out[-1][2] == run[2]:
                p = out[-1]
                out[-1] = (p[0], p[1] + run[1], run[2])
            else:
                out.append(run)
            if len(runs) > 1:
                out.extend(runs[1:])
