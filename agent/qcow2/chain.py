"""QCOW2 chains: a leaf image and its backing files, read as one guest-visible disk.

An unallocated cluster asks the backing file; a zero cluster reads as zeros without asking; a
backing file smaller than its child reads as zeros past its size; reads are bounded by the leaf's
size. The chain holds one fd per file for its life and answers the same calls as agent.vhd.Chain
(see agent/qcow2/__init__.py), on a grid of 2 MiB blocks made of whole clusters.
"""

import collections
import os
import stat

from agent.qcow2.errors import Qcow2ChainError, Qcow2Error, UnsupportedQcow2
from agent.qcow2.file import (
    BEYOND,
    BLOCK_SIZE,
    COMPRESSED,
    DATA,
    UNALLOC,
    ZERO,
    _Level,
    open_level,
)

Extent = collections.namedtuple("Extent", "offset length zero")
# kind 'zero' | 'file' (bytes [offset, +length) of file.fileno()) | 'assemble' (read_block) |
# 'pieces': the block is `pieces`, ((level or None for zeros, file offset, length), ...) in order,
# each level piece sendfile-able (a block whose clusters lie in several places or files).
BlockSource = collections.namedtuple("BlockSource", "kind file offset length pieces")
BlockSource.__new__.__defaults__ = (None,)

DEFAULT_MAX_DEPTH = 64
MAX_PIECES = 64  # more than this (tiny clusters scattered): assemble the block instead
_PREADV = getattr(os, "preadv", None)  # Python 3.7+
_ZEROS = memoryview(bytes(1 << 20))
_VHD_COOKIE = b"conectix"


def _read_at(fd, view, offset):
    """Fill `view` from fd at offset; returns the bytes read (short at the end of the file)."""
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
    step = len(_ZEROS)
    while a < b:
        n = min(b - a, step)
        view[a : a + n] = _ZEROS[:n]
        a += n


def default_resolve_backing(child, name):
    """Path of `child`'s backing file `name`, or None. A relative name is relative to the child's
    directory (qemu's rule; SM's file SRs write a bare `<uuid>.qcow2`); an absolute one is tried
    as it is, then by its base name beside the child (SM's compose writes absolute paths, and an
    SR may be mounted somewhere else than where it was written)."""
    if name.startswith("json:") or "://" in name:
        raise UnsupportedQcow2(
            child.path, "backing file %r is not a local file" % name, "backing file name"
        )
    base = os.path.dirname(os.path.abspath(child.path))
    if os.path.isabs(name):
        candidates = [name, os.path.join(base, os.path.basename(name))]
    else:
        candidates = [os.path.normpath(os.path.join(base, name))]
    for c in candidates:
        try:
            mode = os.stat(c).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            return c
    return None


def open_chain(
    path, max_depth=DEFAULT_MAX_DEPTH, resolve_backing=None, fd=None, end=None, own_fd=False
):
    """Open the chain whose leaf is the QCOW2 image `path` (or the open descriptor fd, whose
    logical size is end; the chain closes it only with own_fd=True, and a failed open never).

    resolve_backing(child, name) -> a path, an opened level (agent.qcow2.open_level(...)), or
    None; default_resolve_backing by default. A backing file with no format extension is probed
    as qemu does (QCOW2 magic, else raw; a VHD is refused)."""
    files = []
    seen = {}
    leaf = None
    try:
        leaf = open_level(path, fd=fd, end=end, own_fd=own_fd, fmt_name="qcow2")
        files.append(leaf)
        seen[leaf.identity] = leaf.path
        cur = leaf
        while cur.kind == "qcow2" and cur.backing_name is not None:
            if len(files) >= max_depth:
                raise Qcow2ChainError(path, "chain deeper than %d files" % max_depth, "depth")
            parent = _open_backing(cur, resolve_backing or default_resolve_backing)
            ident = parent.identity
            if ident in seen:
                where = parent.path
                parent.close()
                raise Qcow2ChainError(
                    cur.path,
                    "backing file %s is already in the chain (loop)" % where,
                    "backing file name",
                )
            seen[ident] = parent.path
            files.append(parent)
            _check_budget(path, files)
            cur = parent
        return Chain(files)
    except BaseException:
        if leaf is not None and fd is not None:
            leaf._owns_fd = False  # the caller's descriptor stays the caller's
        for f in files:
            f.close()
        raise


MAX_CHAIN_L1_BYTES = (
    64 << 20
)  # L1 tables a chain holds in memory (2 TiB of 64 KiB clusters: 32 KiB)


def _check_budget(path, files):
    """Each level's L1 table stays in memory while the chain is open: qemu allows 32 MiB per
    image, so a deep chain of such tiny files could hold GiBs in dom0. Bound the sum."""
    held = sum(len(f.l1) * 8 for f in files if getattr(f, "l1", None) is not None)
    if held > MAX_CHAIN_L1_BYTES:
        raise UnsupportedQcow2(
            path,
            "the chain's %d L1 tables need %d bytes of memory, more than the %d the agent holds "
            "for one chain" % (len(files), held, MAX_CHAIN_L1_BYTES),
            "l1_size",
        )


def _open_backing(child, resolver):
    name = child.backing_name
    found = resolver(child, name)
    if found is None:
        raise Qcow2ChainError(child.path, "backing file %s not found" % name, "backing file name")
    if isinstance(found, _Level):
        return found
    try:
        level = open_level(found, fmt_name=child.backing_format)
    except OSError as exc:
        raise Qcow2ChainError(
            child.path, "cannot open backing file %s: %s" % (found, exc), "backing file name"
        ) from exc
    except Qcow2Error as exc:
        raise Qcow2ChainError(
            child.path, "backing file %s is not usable: %s" % (found, exc), "backing file name"
        ) from exc
    if level.kind == "raw" and child.backing_format is None and _looks_like_vhd(level):
        level.close()
        raise UnsupportedQcow2(
            child.path,
            "backing file %s is a VHD (a QCOW2 chain over a VHD is not supported)" % found,
            "backing file name",
        )
    return level


def _looks_like_vhd(level):
    fd, end = level.fileno(), level.size
    if os.pread(fd, 8, 0) == _VHD_COOKIE:
        return True
    return end >= 512 and os.pread(fd, 8, end - 512) == _VHD_COOKIE


class Chain(object):
    """A leaf-first list of levels read as one disk."""

    format = "qcow2"

    def __init__(self, files):
        self.files = list(files)
        leaf = self.files[0]
        self.size = leaf.size
        self.block_size = BLOCK_SIZE
        self.block_count = (self.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        self.path = leaf.path

    # -- lifetime ------------------------------------------------------------------------------

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

    # -- resolution ----------------------------------------------------------------------------

    def _resolve(self, offset, length):
        """Runs (offset, length, level index or None, kind, where) covering the range, sorted and
        merged: level None reads as zeros; kind DATA (where: file offset) or COMPRESSED."""
        out = []
        pending = [(offset, length)]
        for li, level in enumerate(self.files):
            nxt = []
            for s, n in pending:
                for rs, rn, kind, where in level.map(s, n):
                    if kind == UNALLOC:
                        if nxt and nxt[-1][0] + nxt[-1][1] == rs:
                            nxt[-1] = (nxt[-1][0], nxt[-1][1] + rn)
                        else:
                            nxt.append((rs, rn))
                    elif kind == ZERO or kind == BEYOND:
                        out.append((rs, rn, None, ZERO, None))
                    else:
                        out.append((rs, rn, li, kind, where))
            pending = nxt
            if not pending:
                break
        for s, n in pending:
            out.append((s, n, None, ZERO, None))
        if len(out) < 2:
            return out
        out.sort(key=lambda r: r[0])
        merged = [out[0]]
        for r in out[1:]:
            p = merged[-1]
            if p[2] == r[2] and p[0] + p[1] == r[0] and p[3] == r[3] and r[3] != COMPRESSED:
                if r[2] is None:
                    merged[-1] = (p[0], p[1] + r[1], None, ZERO, None)
                    continue
                if p[4] + p[1] == r[4]:
                    merged[-1] = (p[0], p[1] + r[1], p[2], DATA, p[4])
                    continue
            merged.append(r)
        return merged

    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                "range [%d, %d) outside the disk (%d bytes)" % (offset, offset + length, self.size)
            )

    # -- reads ---------------------------------------------------------------------------------

    def _fill(self, view, offset, length):
        for s, n, li, kind, where in self._resolve(offset, length):
            a = s - offset
            b = a + n
            if li is None:
                _zero(view, a, b)
            elif kind == DATA:
                level = self.files[li]
                inside = max(0, min(n, level.end - where))  # never ask past the file's end
                got = _read_at(level.fileno(), view[a : a + inside], where) if inside else 0
                if got < n:
                    _zero(view, a + got, b)  # a last cluster cut short by the end of the file
            else:
                data = self.files[li].inflate(where)
                within = s - where[0]
                view[a:b] = data[within : within + n]

    def read(self, offset, length):
        """Guest-visible bytes [offset, offset + length)."""
        self._check_range(offset, length)
        buf = bytearray(length)
        if length:
            self._fill(memoryview(buf), offset, length)
        return bytes(buf)

    def read_into(self, offset, buf):
        """Fill the writable buffer `buf` with the guest bytes at offset; returns its length."""
        view = memoryview(buf).cast("B")
        length = len(view)
        self._check_range(offset, length)
        if length:
            self._fill(view, offset, length)
        return length

    def extents(self, offset=0, length=None):
        """[Extent(offset, length, zero)]: zero where the chain's metadata says zeros (zero
        clusters, unallocated everywhere, past a backing file's size), merged."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        out = []
        for s, n, li, _kind, _where in self._resolve(offset, length) if length else ():
            z = li is None
            if out and out[-1].zero == z:
                out[-1] = Extent(out[-1].offset, out[-1].length + n, z)
            else:
                out.append(Extent(s, n, z))
        return out

    def block_range(self, index):
        if index < 0 or index >= self.block_count:
            raise ValueError("block %d outside the disk (%d blocks)" % (index, self.block_count))
        start = index * BLOCK_SIZE
        return start, min(BLOCK_SIZE, self.size - start)

    def block_source(self, index):
        """BlockSource for guest block `index` (see BlockSource above)."""
        start, length = self.block_range(index)
        runs = self._resolve(start, length)
        if len(runs) == 1 and runs[0][2] is None:
            return BlockSource("zero", None, 0, length)
        pieces = []
        for _s, n, li, kind, where in runs:
            if kind == COMPRESSED:
                return BlockSource("assemble", None, 0, length)
            if li is not None:
                level = self.files[li]
                inside = max(0, min(n, level.end - where))
                if inside:
                    pieces.append((level, where, inside))
                n -= inside
                if not n:
                    continue
            if pieces and pieces[-1][0] is None:
                pieces[-1] = (None, 0, pieces[-1][2] + n)
            else:
                pieces.append((None, 0, n))
        if len(pieces) == 1 and pieces[0][0] is not None:
            return BlockSource("file", pieces[0][0], pieces[0][1], length)
        if len(pieces) > MAX_PIECES:
            return BlockSource("assemble", None, 0, length)
        return BlockSource("pieces", None, 0, length, tuple(pieces))

    def read_block(self, index):
        """The guest bytes of block `index` (length = min(block_size, size - start))."""
        start, length = self.block_range(index)
        src = self.block_source(index)
        if src.kind == "zero":
            return bytes(length)
        if src.kind == "file":
            data = os.pread(src.file.fileno(), length, src.offset)
            if len(data) == length:
                return data
        buf = bytearray(length)
        self._fill(memoryview(buf), start, length)
        return bytes(buf)

    def read_block_into(self, index, buf):
        """Fill buf[:length] with the guest bytes of block `index` and return length."""
        start, length = self.block_range(index)
        view = memoryview(buf).cast("B")
        if view.readonly or len(view) < length:
            raise ValueError(
                "block %d needs a writable buffer of %d bytes (got %d%s)"
                % (index, length, len(view), ", read-only" if view.readonly else "")
            )
        self._fill(view[:length], start, length)
        return length

    # -- incremental ---------------------------------------------------------------------------

    def _marks(self, levels):
        marks = bytearray(self.block_count)
        count = self.block_count
        for f in levels:
            for b in f.allocated_blocks():
                if b < count:
                    marks[b] = 1
        return marks

    def changed_blocks(self, base):
        """Sorted block indices where a file above the common ancestor `base` (a Chain or a path)
        has clusters (data, zero or compressed). Qcow2ChainError if base is not an ancestor: the
        files are matched by identity (device, inode), QCOW2 having no uuid of its own."""
        own = None
        if not isinstance(base, Chain):
            own = base = open_chain(base)
        try:
            ids = [f.identity for f in self.files]
            base_ids = [f.identity for f in base.files]
            if base_ids[0] not in ids:
                raise Qcow2ChainError(
                    self.path, "%s is not an ancestor of this chain" % base.path, "base"
                )
            k = ids.index(base_ids[0])
            if ids[k : k + len(base_ids)] != base_ids:
                raise Qcow2ChainError(
                    self.path, "%s has a different ancestry than this chain" % base.path, "base"
                )
            marks = self._marks(self.files[:k])
            return [i for i, v in enumerate(marks) if v]
        finally:
            if own is not None:
                own.close()

    def allocated_blocks(self):
        """Sorted block indices some file of the chain holds and that do not read as zeros."""
        marks = self._marks(self.files)
        return [i for i, v in enumerate(marks) if v and self.block_source(i).kind != "zero"]

    def describe(self):
        return {
            "path": self.path,
            "format": "qcow2",
            "size": self.size,
            "block_size": self.block_size,
            "block_count": self.block_count,
            "depth": self.depth,
            "files": [f.describe() for f in self.files],
        }
