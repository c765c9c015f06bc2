"""VHD chains: a leaf and its ancestors, read as one guest-visible disk.

A clear sector-bitmap bit means "ask the parent"; a parent smaller than its child reads as zeros past
its size; reads are bounded by the leaf's current_size. The chain holds one fd per file for its life.

What lives here: open_chain (walk the leaf's ancestry; agent.vhd.parents finds and checks each
parent) and Chain: reads (read, read_into, read_block, read_block_into: the runs of an
agent.vhd.resolve.SectorMap filled into a buffer, pooled assembly buffers), extents (the map's
presence), block_source / BlockSource (what the servers send per block: 'file', 'assemble' or
'zero'), and the incremental questions (changed_blocks, allocated_blocks). Which level supplies
which sector is agent.vhd.resolve.
"""

import collections
import os
import threading

from agent import speedups
from agent.vhd.errors import ChainError
from agent.vhd.file import FULL, SECTOR, open_level
from agent.vhd.parents import default_resolve_parent, open_parent
from agent.vhd.resolve import SectorMap

_SPAN_MIN_RUNS = 3
# Assembly buffers kept for reuse by all chains together, keyed by size (a fresh 2 MiB buffer per
# block page-faults: glibc gives big freed chunks back to the kernel). Blocks above the cap (VHD allows
# up to 256 MiB) get a buffer of the size they need, as before.
POOL_BYTES = 32 << 20
POOL_MAX_BUFFER = 8 << 20
_pool = {}  # size -> [bytearray]
_pool_held = [0]  # bytes in _pool
_pool_lock = threading.Lock()

_ZEROS = memoryview(bytes(1 << 21))  # source of zero fills (slices of it, no allocation per fill)

Extent = collections.namedtuple("Extent", "offset length zero")
BlockSource = collections.namedtuple("BlockSource", "kind file offset length")

DEFAULT_MAX_DEPTH = 64
_PREADV = getattr(os, "preadv", None)  # Python 3.7+; 3.6 falls back to pread + copy


def _read_at(fd, view, offset):
    """Fill memoryview `view` from fd at offset; short reads (a raw file's partial last sector) leave zeros."""
    want = len(view)
    done = 0
    while done < want:
        if _PREADV is not None:
            n = _PREADV(fd, [view[done:]], offset + done)
        else:
            data = os.pread(fd, want - done, offset + done)
            n = len(data)
            view[done : done + n] = data
        if n <= 0:
            break
        done += n
    return done


def _zero(view, a, b):
    """view[a:b] = zeros, copied from the module's zero buffer."""
    step = len(_ZEROS)
    while a < b:
        n = min(b - a, step)
        view[a : a + n] = _ZEROS[:n]
        a += n


def _span_group(runs):
    """(level, first sector, end sector, file offset, base) of the runs of one level that map sector s to
    file offset base + s * 512 (so one read covers them all), the most numerous group with at least
    _SPAN_MIN_RUNS runs, or None. The read also covers whatever lies between those runs in the file:
    every other run inside the span must be read (or zeroed) after it."""
    groups = {}
    for s, n, li, where in runs:
        if li is None:
            continue
        key = (li, where - s * SECTOR)
        g = groups.get(key)
        if g is None:
            groups[key] = [1, s, s + n]
        else:
            g[0] += 1
            g[2] = s + n
    best = None
    for (li, base), (cnt, s0, s1) in groups.items():
        if cnt >= _SPAN_MIN_RUNS and (best is None or cnt > best[0]):
            best = (cnt, li, s0, s1, base + s0 * SECTOR, base)
    if best is None:
        return None
    return best[1:]


def open_chain(
    path,
    max_depth=DEFAULT_MAX_DEPTH,
    resolve_parent=None,
    raw_parent=None,
    allow_raw=True,
    fd=None,
    end=None,
):
    """Open the chain whose leaf is `path`.

    resolve_parent(child, locators) -> a path, an opened level (VhdFile.open(...)/RawFile.open(...)),
    or None; locators is [(platform code name, decoded path)]. raw_parent: path of the raw file to use
    when a differencing disk has a null parent uuid (LVM `LV-` parents). A leaf without any VHD footer
    is read as a raw file when allow_raw is set (plain-file fast path).
    """
    resolve = resolve_parent or default_resolve_parent
    files = []
    seen = {}
    try:
        leaf = open_level(path, fd=fd, end=end, allow_raw=allow_raw)
        files.append(leaf)
        seen[leaf.identity] = leaf.path
        cur = leaf
        while cur.is_differencing:
            if len(files) >= max_depth:
                raise ChainError(path, "chain deeper than %d files" % max_depth, "depth")
            parent = open_parent(cur, resolve, raw_parent)
            ident = parent.identity
            repeated = parent.uuid is not None and any(f.uuid == parent.uuid for f in files)
            if ident in seen or repeated:
                where = parent.path
                parent.close()
                raise ChainError(
                    cur.path,
                    "parent %s is already in the chain (loop%s)"
                    % (where, ", same uuid as a file above it" if repeated else ""),
                    "parent locator",
                )
            seen[ident] = parent.path
            files.append(parent)
            if not parent.is_vhd:
                break
            cur = parent
        return Chain(files)
    except BaseException:
        for f in files:
            f.close()
        raise


class Chain(object):
    """A leaf-first list of levels read as one disk."""

    def __init__(self, files):
        self.files = list(files)
        leaf = self.files[0]
        self.size = leaf.size
        self.block_size = leaf.block_size
        self.block_count = (self.size + self.block_size - 1) // self.block_size
        self.path = leaf.path
        self._map = SectorMap(self.files)
        self._spb = self.block_size // SECTOR
        # block_source walks the map's levels itself (it stops at the first level that has any of
        # the block's sectors; that walk is its hot path, one call per block served).
        self._levels = self._map.levels
        self._full = self._map.full
        self._fast_limit = self._map.fast_limit

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self):
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def depth(self):
        return len(self.files)

    @property
    def leaf(self):
        return self.files[0]

    @property
    def uuid(self):
        return self.files[0].uuid

    # -- resolution ----------------------------------------------------------------------------------

    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                "range [%d, %d) outside the disk (%d bytes)" % (offset, offset + length, self.size)
            )

    # -- reads ---------------------------------------------------------------------------------------

    def read(self, offset, length):
        """Guest-visible bytes [offset, offset + length)."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        first = offset // SECTOR
        last = (offset + length + SECTOR - 1) // SECTOR
        skip = offset - first * SECTOR
        if last - first <= self._spb:
            # at most a block: assemble in a pooled buffer and copy out once (see read_block)
            buf = self._take_buffer((last - first) * SECTOR)
            try:
                view = memoryview(buf)
                self._fill(view[: (last - first) * SECTOR], first, last - first, zero=True)
                return bytes(view[skip : skip + length])
            finally:
                self._give_buffer(buf)
        buf = bytearray((last - first) * SECTOR)
        self._fill(memoryview(buf), first, last - first)
        if skip == 0 and len(buf) == length:
            return bytes(buf)
        return bytes(buf[skip : skip + length])

    def read_into(self, offset, buf):
        """Fill the writable buffer `buf` with the guest bytes at offset; sector-aligned fast path."""
        view = memoryview(buf).cast("B")
        length = len(view)
        self._check_range(offset, length)
        if offset % SECTOR == 0 and length % SECTOR == 0:
            self._fill(view, offset // SECTOR, length // SECTOR, zero=True)
        else:
            view[:] = self.read(offset, length)
        return length

    def _fill(self, view, first, count, zero=False):
        runs = self._map.runs(first, count)
        span = _span_group(runs)
        if span is not None:
            # One read of the level that supplies most runs (e.g. a root block under small overwrites),
            # then the other runs on top: fewer syscalls than one pread per fragment.
            li, s0, s1, where, _base = span
            a, b = (s0 - first) * SECTOR, (s1 - first) * SECTOR
            got = _read_at(self.files[li].fileno(), view[a:b], where)
            if got < b - a:
                _zero(view, a + got, b)
        for s, n, li, where in runs:
            a = (s - first) * SECTOR
            b = a + n * SECTOR
            if span is not None and li == span[0] and where - s * SECTOR == span[4]:
                continue  # part of the span read (a run of another block of that level is not)
            if li is None:
                if zero or (span is not None and s < span[2] and s + n > span[1]):
                    _zero(view, a, b)
                continue
            got = _read_at(self.files[li].fileno(), view[a:b], where)
            if (zero or span is not None) and got < b - a:
                _zero(view, a + got, b)

    def extents(self, offset=0, length=None):
        """[Extent(offset, length, zero)]: zero where no file of the chain has the sectors."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        if length == 0:
            return []
        first = offset // SECTOR
        last = (offset + length + SECTOR - 1) // SECTOR
        out = []
        stop = offset + length
        for s, n, z in self._map.presence(first, last - first):
            a = max(s * SECTOR, offset)
            b = min((s + n) * SECTOR, stop)
            if b <= a:
                continue
            if out and out[-1].zero == z and out[-1].offset + out[-1].length == a:
                out[-1] = Extent(out[-1].offset, out[-1].length + b - a, z)
            else:
                out.append(Extent(a, b - a, z))
        return out

    def block_range(self, index):
        if index < 0 or index >= self.block_count:
            raise ValueError("block %d outside the disk (%d blocks)" % (index, self.block_count))
        start = index * self.block_size
        return start, min(self.block_size, self.size - start)

    def block_source(self, index):
        """BlockSource(kind, file, offset, length) for guest block `index` (see agent.vhd docs)."""
        start, length = self.block_range(index)
        nsec = (length + SECTOR - 1) // SECTOR
        if start // SECTOR + nsec > self._fast_limit:
            return self._block_source_runs(start, length, nsec)
        # The first level with any of the block's sectors decides: all of them -> 'file', some -> the
        # rest comes from below (or is zeros) -> 'assemble'; no level -> 'zero'.
        full = self._full
        for li, level in enumerate(self._levels):
            if li == full:
                off = start
            else:
                bm = level.block_bitmap(index)
                if bm is None:
                    continue
                if bm is not FULL:
                    present = speedups.bitmap_count(bm, 0, nsec)
                    if present == 0:
                        continue
                    if present != nsec:
                        return BlockSource("assemble", None, 0, length)
                off = level.block_data_offset(index)
            if level.data_range_ok(off, length):
                return BlockSource("file", level, off, length)
            return BlockSource("assemble", None, 0, length)
        return BlockSource("zero", None, 0, length)

    def _block_source_runs(self, start, length, nsec):
        """block_source derived from the map's runs (any grids and sizes)."""
        runs = self._map.runs(start // SECTOR, nsec)
        if len(runs) == 1:
            _s, _n, li, where = runs[0]
            if li is None:
                return BlockSource("zero", None, 0, length)
            level = self.files[li]
            if level.data_range_ok(where, length):
                return BlockSource("file", level, where, length)
        return BlockSource("assemble", None, 0, length)

    def _take_buffer(self, nbytes):
        """A writable buffer of at least nbytes (<= one block): from the shared pool when the block
        size is small enough to pool, else a new one of nbytes. Give it back with _give_buffer."""
        size = self._spb * SECTOR
        if size <= POOL_MAX_BUFFER:
            with _pool_lock:
                free = _pool.get(size)
                if free:
                    _pool_held[0] -= size
                    return free.pop()
            return bytearray(size)
        return bytearray(nbytes)

    def _give_buffer(self, buf):
        size = len(buf)
        if size != self._spb * SECTOR or size > POOL_MAX_BUFFER:
            return  # not from the pool
        with _pool_lock:
            if _pool_held[0] + size <= POOL_BYTES:
                _pool.setdefault(size, []).append(buf)
                _pool_held[0] += size

    def read_block(self, index):
        """The guest bytes of block `index` (length = min(block_size, size - start))."""
        start, length = self.block_range(index)
        src = self.block_source(index)
        if src.kind == "file":
            # one read straight into a bytes object (no assembly buffer, no extra copy)
            data = os.pread(src.file.fileno(), length, src.offset)
            if len(data) == length:
                return data
        elif src.kind == "zero":
            return bytes(length)
        # Assemble in a pooled buffer, then one copy out: a fresh 2 MiB buffer per block plus the
        # bytes copy costs page faults (glibc hands big freed chunks back to the kernel).
        nsec = (length + SECTOR - 1) // SECTOR
        buf = self._take_buffer(nsec * SECTOR)
        try:
            view = memoryview(buf)
            self._fill(view[: nsec * SECTOR], start // SECTOR, nsec, zero=True)
            return bytes(view[:length])
        finally:
            self._give_buffer(buf)

    def read_block_into(self, index, buf):
        """Fill buf[:length] with the guest bytes of block `index` and return length (see read_block).

        buf: a writable buffer of at least that many bytes (e.g. a bytearray of block_size reused
        from block to block); the bytes after length are left as they were."""
        start, length = self.block_range(index)
        view = memoryview(buf).cast("B")
        if view.readonly or len(view) < length:
            raise ValueError(
                "block %d needs a writable buffer of %d bytes (got %d%s)"
                % (index, length, len(view), ", read-only" if view.readonly else "")
            )
        if length % SECTOR:
            view[:length] = self.read_block(index)
        else:
            self._fill(view[:length], start // SECTOR, length // SECTOR, zero=True)
        return length

    # -- incremental ---------------------------------------------------------------------------------

    def changed_blocks(self, base):
        """Sorted block indices allocated in any file above the common ancestor `base` (a Chain or path)."""
        own = None
        if not isinstance(base, Chain):
            own = base = open_chain(base)
        try:
            base_uuid = base.files[0].uuid
            k = None
            for i, f in enumerate(self.files):
                if f.uuid is not None and f.uuid == base_uuid:
                    k = i
                    break
            if k is None or base_uuid is None:
                raise ChainError(
                    self.path,
                    "%s (uuid %s) is not an ancestor of this chain" % (base.path, base_uuid),
                    "base",
                )
            for j, bf in enumerate(base.files):
                if k + j >= len(self.files) or self.files[k + j].uuid != bf.uuid:
                    raise ChainError(
                        self.path, "%s has a different ancestry than this chain" % base.path, "base"
                    )
            changed = set()
            bs = self.block_size
            for f in self.files[:k]:
                if f.block_size == bs:
                    changed.update(b for b in f.allocated_blocks() if b < self.block_count)
                else:
                    for b in f.allocated_blocks():
                        first = b * f.block_size // bs
                        last = min(((b + 1) * f.block_size - 1) // bs, self.block_count - 1)
                        changed.update(range(first, last + 1))
            return sorted(changed)
        finally:
            if own is not None:
                own.close()

    def allocated_blocks(self):
        """Sorted block indices where some file of the chain holds sectors (the others read as zeros)."""
        if not self._map.same_grid or any(not f.is_vhd or f.bat is None for f in self.files):
            candidates = range(self.block_count)
        else:
            found = set()
            for f in self.files:
                found.update(b for b in f.allocated_blocks() if b < self.block_count)
            candidates = sorted(found)
        return [i for i in candidates if self.block_source(i).kind != "zero"]

    def describe(self):
        return {
            "path": self.path,
            "size": self.size,
            "block_size": self.block_size,
            "block_count": self.block_count,
            "depth": self.depth,
            "files": [f.describe() for f in self.files],
        }
