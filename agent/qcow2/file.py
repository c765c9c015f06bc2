"""One level of a QCOW2 chain: a QCOW2 image or a raw backing file, opened read-only.

Every level answers map(offset, length) with runs (offset, length, kind, where) covering the range:
  DATA        the bytes are at file offset `where` (contiguous for the run's length)
  ZERO        the bytes read as zeros here (zero flag); the backing file is not consulted
  UNALLOC     this level does not have them: ask the backing file (zeros if there is none)
  COMPRESSED  part of one compressed cluster: where = (cluster's guest offset, host offset, bytes)
  BEYOND      past this level's size: zeros, whatever the levels below hold
Guest offsets and lengths are bytes (clusters are at least 512 bytes). Every table and cluster
offset is checked against the file's logical end before it is read; an L2 table is checked when it
is first read (the whole L1 table at open), so a corrupt entry fails the request that meets it
with a typed error naming the table and the entry. Refcounts are never read.

L2 tables are kept per level in a small LRU as run lists (start index, count, kind, host offset;
compact arrays), so a mostly-sequential table costs a few runs and a whole-disk extent query walks
runs, not clusters; the LRU holds at most L2_CACHE_RUNS runs (and at least two tables).
"""

import array
import bisect
import collections
import os
import stat
import sys
import threading
import uuid as uuidlib
import zlib

from agent.qcow2 import format as fmt
from agent.qcow2.errors import CorruptQcow2, UnsupportedQcow2
from agent.vhd.errors import VhdError
from agent.vhd.file import open_readonly as _vhd_open_readonly

DATA = 0
ZERO = 1
UNALLOC = 2
COMPRESSED = 3
BEYOND = 4
KIND_NAMES = {DATA: "data", ZERO: "zero", UNALLOC: "unallocated", COMPRESSED: "compressed"}

BLOCK_SIZE = 2 << 20  # the chain's block grid (see agent/qcow2/__init__.py)
L2_CACHE_RUNS = 1 << 17  # runs kept per level (a fully fragmented 64 KiB-cluster table is 8192)
DECOMPRESSED_CACHE_BYTES = 8 << 20
_ZERO_TABLES = {}  # cluster size -> bytes of zeros (an all-unallocated L2 table)


def open_readonly(path):
    """agent.vhd.file.open_readonly (regular files and block devices only, never blocking on a
    FIFO), its refusal as a QCOW2 error."""
    try:
        return _vhd_open_readonly(path)
    except VhdError as exc:
        raise UnsupportedQcow2(path, exc.detail) from None


def _logical_end(fd):
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)


def _pread(fd, length, offset, path, what):
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise CorruptQcow2(
            path, "short read of %d bytes at offset %d (got %d)" % (length, offset, len(data)), what
        )
    return data


def _uuid_from_name(path):
    """SM names a QCOW2 VDI <uuid>.qcow2 (file SRs) or QCOW2-<uuid> (LVM SRs)."""
    name = os.path.basename(path)
    for prefix, suffix in (("", ".qcow2"), ("QCOW2-", ""), ("LV-", ""), ("", ".raw")):
        if name.startswith(prefix) and name.endswith(suffix):
            text = name[len(prefix) : len(name) - len(suffix)]
            try:
                u = uuidlib.UUID(text)
            except ValueError:
                continue
            if str(u) == text:
                return u
    return None


class _Level(object):
    kind = "level"
    is_vhd = False
    footer = None
    header = None
    parent_uuid = None
    hidden = 0
    path = None
    size = 0
    block_size = BLOCK_SIZE
    backing_name = None
    backing_format = None
    _fd = -1
    _owns_fd = True

    def fileno(self):
        return self._fd

    def close(self):
        if self._fd >= 0 and self._owns_fd:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def identity(self):
        st = os.fstat(self._fd)
        if stat.S_ISBLK(st.st_mode):
            return ("blk", st.st_rdev)
        return (st.st_dev, st.st_ino)

    @property
    def block_count(self):
        return (self.size + BLOCK_SIZE - 1) // BLOCK_SIZE

    def guard_regions(self):
        """(offset, length) of metadata that agent.export's guard re-reads on a block device."""
        return []


class RawLevel(_Level):
    """A raw backing file (SM's `-F raw` parents): every byte below its size is data."""

    kind = "raw"

    def __init__(self, path, fd=None, end=None, own_fd=False):
        self.path = path
        if fd is None:
            self._fd = open_readonly(path)
            self._owns_fd = True
        else:
            self._fd = fd
            self._owns_fd = False
        try:
            self.size = _logical_end(self._fd) if end is None else end
        except OSError:
            self.close()
            raise
        if fd is not None and own_fd:
            self._owns_fd = True
        self.end = self.size
        self.uuid = _uuid_from_name(path)

    @classmethod
    def open(cls, path, fd=None, end=None, own_fd=False):
        return cls(path, fd=fd, end=end, own_fd=own_fd)

    def map(self, offset, length):
        end = offset + length
        lim = min(end, self.size)
        runs = []
        if lim > offset:
            runs.append((offset, lim - offset, DATA, offset))
        if end > max(offset, self.size):
            start = max(offset, self.size)
            runs.append((start, end - start, BEYOND, None))
        return runs

    def allocated_blocks(self):
        return range(self.block_count)

    def describe(self):
        d = {"path": self.path, "type": "raw", "size": self.size}
        if self.uuid is not None:
            d["uuid"] = str(self.uuid)
        return d


class Qcow2File(_Level):
    kind = "qcow2"

    def __init__(self, path, fd, end):
        self.path = path
        self._fd = fd
        self._owns_fd = False
        self.end = end
        self.qcow2_header = None
        self.l1 = None
        self.uuid = _uuid_from_name(path)
        self._tables = collections.OrderedDict()  # L1 index -> (starts, counts, kinds, hosts)
        self._cached_runs = 0
        self._inflated = collections.OrderedDict()  # guest cluster offset -> bytes
        self._inflated_bytes = 0
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    @classmethod
    def open(cls, path, fd=None, end=None, own_fd=False):
        """Open and validate a QCOW2 image. fd: an open descriptor (an LV's device), closed by
        close() only with own_fd=True and never by a failed open; end: its logical size."""
        opened = fd is None
        if opened:
            fd = open_readonly(path)
        try:
            if end is None:
                end = _logical_end(fd)
            self = cls(path, fd, end)
            self._load()
        except BaseException:
            if opened:
                os.close(fd)
            raise
        self._owns_fd = opened or bool(own_fd)
        return self

    # -- parsing ---------------------------------------------------------------------------------

    def _load(self):
        path, fd, end = self.path, self._fd, self.end
        head = os.pread(fd, min(24, end), 0) if end > 0 else b""
        cs = fmt.first_cluster_size(path, head)
        h = fmt.parse_header(path, os.pread(fd, min(cs, end), 0))
        fmt.check_header(path, h, end)
        self.qcow2_header = h
        self.size = h.size
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.l2_bits = h.l2_bits
        self.hidden = h.hidden or 0
        self.backing_name = h.backing_name
        self.backing_format = h.backing_format
        need = h.l1_needed()
        raw = _pread(fd, need * 8, h.l1_table_offset, path, "L1 table") if need else b""
        l1 = array.array("Q")
        if l1.itemsize != 8:  # pragma: no cover
            l1 = array.array("L")
        l1.frombytes(raw)
        if sys.byteorder == "little":
            l1.byteswap()
        cs = self.cluster_size
        for i, e in enumerate(l1):
            off = e & fmt.L1E_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                raise CorruptQcow2(
                    path, "L2 table offset %d is not cluster-aligned" % off, "L1[%d]" % i
                )
            if off + cs > end:
                raise CorruptQcow2(
                    path,
                    "L2 table at offset %d (+%d bytes) past the end of the file (%d)"
                    % (off, cs, end),
                    "L1[%d]" % i,
                )
        self.l1 = l1

    # -- L2 tables -------------------------------------------------------------------------------

    def _table(self, l1i):
        """Run list of the L2 table under L1 entry l1i, or None when the table is absent."""
        off = self.l1[l1i] & fmt.L1E_OFFSET_MASK
        if not off:
            return None
        with self._lock:
            runs = self._tables.get(l1i)
            if runs is not None:
                self._tables.move_to_end(l1i)
                return runs
        # One loader at a time: the NBD connections of an export ask for the same tables at once
        # (nbdcopy's first BLOCK_STATUS on each connection); parse each once, not once per thread.
        with self._load_lock:
            with self._lock:
                runs = self._tables.get(l1i)
                if runs is not None:
                    self._tables.move_to_end(l1i)
                    return runs
            raw = _pread(self._fd, self.cluster_size, off, self.path, "L2 table of L1[%d]" % l1i)
            runs = self._table_runs(l1i, raw)
            with self._lock:
                self._tables[l1i] = runs
                self._cached_runs += len(runs[0])
                while self._cached_runs > L2_CACHE_RUNS and len(self._tables) > 2:
                    _k, old = self._tables.popitem(last=False)
                    self._cached_runs -= len(old[0])
        return runs

    def _table_runs(self, l1i, raw):
        n = len(raw) // 8
        zeros = _ZERO_TABLES.get(len(raw))
        if zeros is None:
            zeros = _ZERO_TABLES.setdefault(len(raw), bytes(len(raw)))
        if raw == zeros:
            return _runs([0], [n], [UNALLOC], [0])
        entries = array.array("Q")
        if entries.itemsize != 8:  # pragma: no cover
            entries = array.array("L")
        entries.frombytes(raw)
        if sys.byteorder == "little":
            entries.byteswap()
        starts, counts, kinds, hosts = _runs()
        cs = self.cluster_size
        end = self.end
        path = self.path
        prev_kind = -1
        next_host = -1
        for j, e in enumerate(entries):
            if e & fmt.OFLAG_COMPRESSED:
                coff, clen = fmt.compressed_extent(e, self.cluster_bits)
                if coff >= end or coff < cs:
                    raise CorruptQcow2(
                        path,
                        "compressed cluster at offset %d outside the file (%d bytes)" % (coff, end),
                        "L2[%d] of L1[%d]" % (j, l1i),
                    )
                starts.append(j)
                counts.append(1)
                kinds.append(COMPRESSED)
                hosts.append(e)
                prev_kind = COMPRESSED
                continue
            if e & fmt.OFLAG_ZERO:
                kind = ZERO
            else:
                host = e & fmt.L2E_OFFSET_MASK
                if not host:
                    kind = UNALLOC
                else:
                    if host % cs:
                        raise CorruptQcow2(
                            path,
                            "data cluster offset %d is not cluster-aligned" % host,
                            "L2[%d] of L1[%d]" % (j, l1i),
                        )
                    if host >= end:
                        raise CorruptQcow2(
                            path,
                            "data cluster at offset %d past the end of the file (%d)" % (host, end),
                            "L2[%d] of L1[%d]" % (j, l1i),
                        )
                    if prev_kind == DATA and host == next_host:
                        counts[-1] += 1
                    else:
                        starts.append(j)
                        counts.append(1)
                        kinds.append(DATA)
                        hosts.append(host)
                        prev_kind = DATA
                    next_host = host + cs
                    continue
            if kind == prev_kind:
                counts[-1] += 1
            else:
                starts.append(j)
                counts.append(1)
                kinds.append(kind)
                hosts.append(0)
                prev_kind = kind
        return (starts, counts, kinds, hosts)

    # -- queries ---------------------------------------------------------------------------------

    def map(self, offset, length):
        """Runs (offset, length, kind, where) covering [offset, offset + length) (module docs)."""
        runs = []
        end = offset + length
        lim = min(end, self.size)
        cb = self.cluster_bits
        span_bits = cb + self.l2_bits
        pos = offset
        while pos < lim:
            l1i = pos >> span_bits
            table_start = l1i << span_bits
            stop = min(lim, table_start + (1 << span_bits))
            table = self._table(l1i)
            if table is None:
                _add(runs, pos, stop - pos, UNALLOC, None)
                pos = stop
                continue
            starts, counts, kinds, hosts = table
            k = bisect.bisect_right(starts, (pos - table_start) >> cb) - 1
            while pos < stop:
                run_start = table_start + (starts[k] << cb)
                run_end = min(stop, run_start + (counts[k] << cb))
                kind = kinds[k]
                n = run_end - pos
                if kind == DATA:
                    _add(runs, pos, n, DATA, hosts[k] + (pos - run_start))
                elif kind == COMPRESSED:
                    coff, clen = fmt.compressed_extent(hosts[k], cb)
                    runs.append((pos, n, COMPRESSED, (run_start, coff, clen)))
                else:
                    _add(runs, pos, n, kind, None)
                pos = run_end
                k += 1
        if end > max(offset, self.size):
            start = max(offset, self.size)
            _add(runs, start, end - start, BEYOND, None)
        return runs

    def inflate(self, where):
        """The guest bytes of a compressed cluster (where: the COMPRESSED run's `where`)."""
        guest, coff, clen = where
        with self._lock:
            data = self._inflated.get(guest)
            if data is not None:
                self._inflated.move_to_end(guest)
                return data
        clen = min(clen, self.end - coff)
        raw = os.pread(self._fd, clen, coff)
        try:
            d = zlib.decompressobj(-12)
            data = d.decompress(raw, self.cluster_size)
        except zlib.error as exc:
            raise CorruptQcow2(
                self.path,
                "compressed cluster at offset %d does not inflate: %s" % (coff, exc),
                "compressed cluster for guest offset %d" % guest,
            ) from None
        if len(data) != self.cluster_size:
            raise CorruptQcow2(
                self.path,
                "compressed cluster at offset %d inflates to %d bytes, not %d"
                % (coff, len(data), self.cluster_size),
                "compressed cluster for guest offset %d" % guest,
            )
        with self._lock:
            self._inflated[guest] = data
            self._inflated_bytes += len(data)
            while self._inflated_bytes > DECOMPRESSED_CACHE_BYTES and len(self._inflated) > 1:
                _k, old = self._inflated.popitem(last=False)
                self._inflated_bytes -= len(old)
        return data

    def allocated_blocks(self):
        """Indices of the 2 MiB blocks where this level has any cluster that is not unallocated
        (data, zero flag, compressed): what it changes over its backing file. From the L2 tables
        (metadata only), in order."""
        out = array.array("I")
        cb = self.cluster_bits
        entries = 1 << self.l2_bits
        nblocks = self.block_count
        last = -1
        for l1i, e in enumerate(self.l1):
            off = e & fmt.L1E_OFFSET_MASK
            if not off:
                continue
            with self._lock:
                table = self._tables.get(l1i)
            if table is None:  # read, not cached: one pass over every table must not evict
                raw = _pread(
                    self._fd, self.cluster_size, off, self.path, "L2 table of L1[%d]" % l1i
                )
                table = self._table_runs(l1i, raw)  # validates the entries too
            starts, counts, kinds, _hosts = table
            base = l1i * entries
            for s, c, kind in zip(starts, counts, kinds):
                if kind == UNALLOC:
                    continue
                first = (base + s) * (1 << cb) // BLOCK_SIZE
                final = ((base + s + c) * (1 << cb) - 1) // BLOCK_SIZE
                for b in range(max(first, last + 1), min(final, nblocks - 1) + 1):
                    out.append(b)
                    last = b
        return out

    def guard_regions(self):
        h = self.qcow2_header
        regions = [(0, min(self.end, 4096, self.cluster_size))]
        need = h.l1_needed() * 8
        if 0 < need <= 256 << 10:
            regions.append((h.l1_table_offset, need))
        return regions

    def describe(self):
        h = self.qcow2_header
        d = {
            "path": self.path,
            "type": "qcow2",
            "size": self.size,
            "hidden": bool(self.hidden),
            "cluster_size": self.cluster_size,
            "block_size": BLOCK_SIZE,
            "blocks": self.block_count,
            "allocated_blocks": len(self.allocated_blocks()),
        }
        d.update(h.as_dict())
        if self.uuid is not None:
            d["uuid"] = str(self.uuid)
        return d


def _runs(starts=(), counts=(), kinds=(), hosts=()):
    """An empty (or given) run list of an L2 table as compact arrays: start entry, entries, kind,
    host offset (or the raw entry of a compressed cluster); 17 bytes a run."""
    return (
        array.array("I", starts),
        array.array("I", counts),
        array.array("B", kinds),
        _u64(hosts),
    )


def _u64(values=()):
    a = array.array("Q")
    if a.itemsize != 8:  # pragma: no cover
        a = array.array("L")
    a.extend(values)
    return a


def _add(runs, pos, n, kind, where):
    """Append a run, merging it into the previous one when it continues it."""
    if runs:
        p = runs[-1]
        if p[2] == kind and p[0] + p[1] == pos and kind != COMPRESSED:
            if kind != DATA:
                runs[-1] = (p[0], p[1] + n, kind, None)
                return
            if p[3] + p[1] == where:
                runs[-1] = (p[0], p[1] + n, kind, p[3])
                return
    runs.append((pos, n, kind, where))


def probe(fd):
    """'qcow2' when the descriptor's first bytes are the QCOW2 magic, else 'raw'."""
    return "qcow2" if os.pread(fd, 4, 0) == fmt.MAGIC else "raw"


def open_level(path, fd=None, end=None, own_fd=False, fmt_name=None):
    """A Qcow2File, or a RawLevel for fmt_name 'raw' (None: by the magic, as qemu probes)."""
    opened = fd is None
    if opened:
        fd = open_readonly(path)
    try:
        kind = fmt_name or probe(fd)
        if kind == "qcow2":
            level = Qcow2File.open(path, fd=fd, end=end, own_fd=True)
        elif kind == "raw":
            level = RawLevel.open(path, fd=fd, end=end, own_fd=True)
        else:
            raise UnsupportedQcow2(path, "format %r (only qcow2 and raw)" % kind, "format")
    except BaseException:
        if opened:
            os.close(fd)
        raise
    level._owns_fd = opened or bool(own_fd)
    return level
