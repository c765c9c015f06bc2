"""One level of a chain: a VHD file (fixed, dynamic, differencing) or a raw file, opened read-only.

Everything read from the file is checked against the file's logical end before it is allocated or
read. A level can be opened from a path or from an already open fd with an explicit logical end (a VHD
inside a larger block device: LVM logical volumes are bigger than the VHD they hold, and the footer
sits in the last 512 bytes of the VHD, not of the device).

Every level answers `sectors_present(first, count)` with runs of (start, count, where): where is the
byte offset of the data in the file, None when this level does not have the sectors (ask the parent),
or BEYOND when the sectors lie past this level's size (they read as zeros).
"""

import array
import bisect
import collections
import os
import stat
import sys
import threading

from agent import speedups
from agent.vhd import format as fmt
from agent.vhd.errors import CorruptVhd, UnsupportedVhd

BEYOND = -1
BITMAP_CACHE_ENTRIES = 8192  # per file, and at most BITMAP_CACHE_BYTES of bitmaps
BITMAP_CACHE_BYTES = 4 << 20
SECTOR = fmt.SECTOR


class NotVhd(CorruptVhd):
    """No VHD footer anywhere (the file may be raw)."""


def _pread(fd, length, offset, path, what):
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise CorruptVhd(
            path, "short read of %d bytes at offset %d (got %d)" % (length, offset, len(data)), what
        )
    return data


MAX_BLOCKS = 1 << 20  # blocks a VHD may map (2 TiB at 2 MiB): bounds what an open allocates


def open_readonly(path):
    """Open a regular file or block device read-only. Anything else (a FIFO or a character device a
    hostile locator may name) is refused without blocking. A path that knows how to open itself
    (agent.rooted.RootedPath: an O_NOFOLLOW walk from its SR root) is opened that way."""
    own_open = getattr(path, "open_readonly", None)
    if own_open is not None:
        fd = own_open()
    else:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise UnsupportedVhd(path, "not a regular file or block device")
    return fd


def _logical_end(fd):
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)


class Level(object):
    """What the chain needs from each file."""

    kind = "level"
    path = None
    size = 0
    block_size = fmt.DEFAULT_BLOCK_SIZE
    footer = None
    header = None
    uuid = None
    parent_uuid = None
    hidden = 0
    is_vhd = False
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
        return (st.st_dev, st.st_ino)

    @property
    def size_sectors(self):
        return (self.size + SECTOR - 1) // SECTOR

    @property
    def block_count(self):
        return (self.size + self.block_size - 1) // self.block_size

    @property
    def is_differencing(self):
        return False

    def allocated_blocks(self):
        """Indices (in this level's own block grid) of blocks that hold data."""
        return list(range(self.block_count))

    def block_bitmap(self, index):
        """Sector bitmap of a block: None (absent), FULL (every sector) or bytes (MSB first)."""
        return FULL


FULL = object()


class RawFile(Level):
    """A raw image (LVM `LV-` parent, or a plain file given as a chain): every sector is present."""

    kind = "raw"

    def __init__(self, path, fd=None, end=None, block_size=fmt.DEFAULT_BLOCK_SIZE, own_fd=False):
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
        self.block_size = block_size
        self.data_end = self.size

    @classmethod
    def open(cls, path, fd=None, end=None, own_fd=False):
        """fd: an open descriptor, closed by close() only with own_fd=True; end: logical size."""
        return cls(path, fd=fd, end=end, own_fd=own_fd)

    def sectors_present(self, first, count):
        return _flat_sectors(first, count, self.size_sectors, 0)

    def data_range_ok(self, offset, length):
        return offset + length <= self.data_end

    def describe(self):
        return {"path": self.path, "type": "raw", "size": self.size}


def _flat_sectors(first, count, size_sectors, base):
    runs = []
    end = first + count
    lim = min(end, size_sectors)
    if lim > first:
        runs.append((first, lim - first, base + first * SECTOR))
    if end > max(first, size_sectors):
        start = max(first, size_sectors)
        runs.append((start, end - start, BEYOND))
    return runs


class VhdFile(Level):
    kind = "vhd"
    is_vhd = True

    def __init__(self, path, fd, owns_fd, end):
        self.path = path
        self._fd = fd
        self._owns_fd = owns_fd
        self.end = end
        self.footer = None
        self.header = None
        self.bat = None
        self.batmap = None
        self.footer_at = None
        self.data_end = end
        self._cache = collections.OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path, fd=None, end=None, own_fd=False):
        """Open and validate a VHD.

        fd: an already open descriptor (e.g. an LV's block device); close() closes it only with
        own_fd=True, and a failed open never closes it. end: the VHD's logical end inside that file
        or device (its footer is in the 512 bytes before `end`); default: the file's size.
        """
        opened = fd is None
        if opened:
            fd = open_readonly(path)
        try:
            if end is None:
                end = _logical_end(fd)
            self = cls(path, fd, False, end)
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
        head = os.pread(fd, min(FOOTER_PROBE, end), 0) if end > 0 else b""
        if head[:4] == fmt.QCOW2_MAGIC:
            raise UnsupportedVhd(path, "this is a QCOW2 image, not a VHD (agent.qcow2 reads it)")
        footer, where = self._find_footer(head)
        self.footer = footer
        self.footer_at = where
        if where == "end":
            self.data_end = end - fmt.FOOTER_SIZE
        elif where == "short":
            self.data_end = end - (fmt.FOOTER_SIZE - 1)
        else:
            self.data_end = end
        self._check_footer()
        self.size = footer.current_size
        self.uuid = footer.uuid
        self.hidden = footer.hidden
        if footer.disk_type == fmt.DISK_FIXED:
            self.block_size = fmt.DEFAULT_BLOCK_SIZE
            if self.size > self.data_end:
                raise CorruptVhd(
                    path,
                    "fixed disk of %d bytes does not fit in the file (%d bytes of data)"
                    % (self.size, self.data_end),
                    "current_size",
                )
            return
        self._load_header()
        self._load_bat()
        self._load_batmap()
        self._check_locators()
        self._hidden_quirk()

    def _find_footer(self, head):
        path, fd, end = self.path, self._fd, self.end
        candidates = []
        if end >= fmt.FOOTER_SIZE:
            candidates.append(("end", end - fmt.FOOTER_SIZE, fmt.FOOTER_SIZE))
        if end >= fmt.FOOTER_SIZE - 1:
            candidates.append(("short", end - (fmt.FOOTER_SIZE - 1), fmt.FOOTER_SIZE - 1))
        candidates.append(("copy", 0, fmt.FOOTER_SIZE))
        bad = None
        for where, offset, length in candidates:
            if where == "copy":
                data = head[: fmt.FOOTER_SIZE]
            else:
                data = os.pread(fd, length, offset)
            cookie = bytes(data[:8])
            if cookie == fmt.POISON_COOKIE:
                raise UnsupportedVhd(
                    path,
                    "footer cookie is v_poison: the VHD was disabled by an interrupted vhd-util operation",
                    "footer cookie",
                )
            if cookie != fmt.FOOTER_COOKIE:
                continue
            if len(data) < length:
                bad = bad or ("file too short (%d bytes) for a footer" % end)
                continue
            footer = fmt.Footer.parse(data)
            if not footer.checksum_ok():
                bad = bad or (
                    "checksum 0x%08x, computed 0x%08x (%s footer)"
                    % (footer.checksum, footer.computed_checksum(), where)
                )
                continue
            if where == "copy" and footer.disk_type == fmt.DISK_FIXED:
                # A fixed disk has no copy at offset 0: those bytes are guest data.
                continue
            return footer, where
        if bad:
            raise CorruptVhd(path, bad, "footer")
        raise NotVhd(path, "no VHD footer (cookie 'conectix') at the end or at offset 0", "footer")

    def _check_footer(self):
        f, path = self.footer, self.path
        if f.version >> 16 != 1:
            raise UnsupportedVhd(path, "file format version 0x%08x" % f.version, "footer version")
        if f.disk_type not in (fmt.DISK_FIXED, fmt.DISK_DYNAMIC, fmt.DISK_DIFF):
            raise UnsupportedVhd(
                path,
                "disk type %d (only fixed 2, dynamic 3, differencing 4)" % f.disk_type,
                "disk_type",
            )
        if f.disk_type != fmt.DISK_FIXED and f.creator_app[:3] == b"tap" and f.creator_version == 1:
            raise UnsupportedVhd(
                path,
                "blktap 0.1 VHD with little-endian sector bitmaps (convert it with vhd-util first)",
                "creator_version",
            )
        if f.current_size > fmt.MAX_SIZE:
            raise UnsupportedVhd(
                path,
                "%d bytes exceeds the VHD maximum of 2040 GiB" % f.current_size,
                "current_size",
            )

    def _load_header(self):
        f, path, end = self.footer, self.path, self.end
        if f.data_offset == fmt.NO_OFFSET or f.data_offset + fmt.HEADER_SIZE > end:
            raise CorruptVhd(
                path,
                "header offset %d outside the file (%d bytes)" % (f.data_offset, end),
                "footer data_offset",
            )
        raw = _pread(self._fd, fmt.HEADER_SIZE, f.data_offset, path, "dynamic header")
        h = fmt.Header.parse(raw)
        if h.cookie != fmt.HEADER_COOKIE:
            raise CorruptVhd(path, "cookie %r instead of 'cxsparse'" % h.cookie, "header cookie")
        if h.computed_checksum() != h.checksum:
            raise CorruptVhd(
                path,
                "checksum 0x%08x, computed 0x%08x" % (h.checksum, h.computed_checksum()),
                "header checksum",
            )
        if h.version >> 16 != 1:
            raise UnsupportedVhd(path, "header version 0x%08x" % h.version, "header version")
        bs = h.block_size
        if bs < fmt.MIN_BLOCK_SIZE or bs > fmt.MAX_BLOCK_SIZE or bs & (bs - 1):
            raise CorruptVhd(
                path, "%d is not a power of two between 512 B and 256 MiB" % bs, "block_size"
            )
        self.header = h
        self.block_size = bs
        self.sectors_per_block = bs // SECTOR
        self.bitmap_size = fmt.bitmap_bytes(bs)
        self.bitmap_used = (self.sectors_per_block + 7) // 8
        if self.footer.disk_type == fmt.DISK_DIFF:
            self.parent_uuid = h.parent_uuid

    def _load_bat(self):
        h, path = self.header, self.path
        count = self.block_count
        if count > MAX_BLOCKS:
            # A tiny sparse file can declare millions of tiny blocks: memory and CPU at open grow
            # with the count (the agent is root in dom0, whose memory every VM's backend shares).
            raise UnsupportedVhd(
                path,
                "%d blocks of %d bytes: more than the %d blocks the agent maps (vhd-util writes "
                "2 MiB blocks: 1,044,480 for the largest VHD, 2040 GiB)"
                % (count, self.block_size, MAX_BLOCKS),
                "block_size",
            )
        if h.max_table_entries < count:
            raise CorruptVhd(
                path,
                "%d entries cannot map %d blocks of %d bytes"
                % (h.max_table_entries, count, self.block_size),
                "max_table_entries",
            )
        table_bytes = h.max_table_entries * 4
        if h.table_offset + table_bytes > self.end:
            raise CorruptVhd(
                path,
                "table of %d entries at offset %d does not fit in the file (%d bytes)"
                % (h.max_table_entries, h.table_offset, self.end),
                "table_offset",
            )
        # Only the entries that map the disk's size matter (LVM SRs pre-size the BAT for 2 TiB).
        raw = _pread(self._fd, count * 4, h.table_offset, path, "BAT") if count else b""
        bat = array.array("I")
        if bat.itemsize != 4:  # pragma: no cover
            bat = array.array("L")
        bat.frombytes(raw)
        if sys.byteorder == "little":
            bat.byteswap()
        self.bat = bat
        self._allocated_index = []  # sorted indices of allocated blocks (filled by _check_bat)
        self._check_bat()

    def _check_bat(self):
        bat, path = self.bat, self.path
        count = len(bat)
        if not count:
            return
        full = self.bitmap_size + self.block_size
        last = count - 1
        last_len = self.bitmap_size + _round_sector(self.size - last * self.block_size)
        limit = self.data_end
        h = self.header
        meta = [
            (0, fmt.FOOTER_SIZE, "footer copy"),
            (self.footer.data_offset, fmt.HEADER_SIZE, "dynamic header"),
            (h.table_offset, h.max_table_entries * 4, "BAT"),
        ]
        allocated = []
        indices = self._allocated_index
        unused = fmt.BAT_UNUSED
        max_sector = (limit - full) // SECTOR  # an entry above this needs the precise check below
        for i, e in enumerate(bat):
            if e == unused:
                continue
            indices.append(i)
            if e > max_sector:
                length = last_len if i == last else full
                if e * SECTOR + length > limit:
                    raise CorruptVhd(
                        path,
                        "block at sector %d (+%d bytes) past the end of the data area (%d)"
                        % (e, length, limit),
                        "BAT[%d]" % i,
                    )
            allocated.append(e)
        if not allocated:
            return
        allocated.sort()
        last_entry = bat[last]
        prev = None
        for e in allocated:
            if prev is not None:
                prev_len = last_len if prev == last_entry else full
                if prev * SECTOR + prev_len > e * SECTOR:
                    raise CorruptVhd(path, "blocks at sectors %d and %d overlap" % (prev, e), "BAT")
            prev = e
        for start, length, what in meta:
            if not length:
                continue
            for e in _entries_near(allocated, start, length):
                elen = last_len if e == last_entry else full
                if e * SECTOR < start + length and start < e * SECTOR + elen:
                    raise CorruptVhd(
                        path, "a block at sector %d overlaps the %s" % (e, what), "BAT"
                    )

    def _load_batmap(self):
        f, h = self.footer, self.header
        if f.creator_app[:3] != b"tap":
            return
        off = h.table_offset + fmt.sectors_padded(h.max_table_entries * 4)
        if off + SECTOR > self.end:
            return
        raw = os.pread(self._fd, SECTOR, off)
        if raw[:8] != fmt.BATMAP_COOKIE:
            return
        bh = fmt.BatmapHeader.parse(raw)
        if bh.keyhash_cookie == 1:
            raise UnsupportedVhd(
                self.path,
                "the VHD is encrypted (blktap keyhash set); encrypted VHDs are not supported",
                "batmap keyhash",
            )
        if bh.version > fmt.BATMAP_VERSION:
            return
        nbytes = bh.batmap_size * SECTOR
        need = (self.block_count + 7) // 8
        if (
            nbytes < need
            or nbytes > fmt.sectors_padded((h.max_table_entries + 7) // 8)
            or bh.batmap_offset + nbytes > self.end
        ):
            return  # tolerated: a batmap we cannot trust is simply not used
        data = os.pread(self._fd, nbytes, bh.batmap_offset)
        if len(data) != nbytes or fmt.batmap_checksum(data, bh.version) != bh.checksum:
            return
        self.batmap = bytes(data[:need])

    def _check_locators(self):
        if self.footer.disk_type != fmt.DISK_DIFF:
            return
        for i, loc in enumerate(self.header.locators):
            if loc.code not in (fmt.PLAT_W2KU, fmt.PLAT_W2RU, fmt.PLAT_MACX):
                continue
            if (
                loc.data_length > fmt.MAX_LOCATOR_BYTES
                or loc.data_offset + loc.data_length > self.end
            ):
                raise CorruptVhd(
                    self.path,
                    "%s locator of %d bytes at offset %d outside the file"
                    % (loc.name, loc.data_length, loc.data_offset),
                    "parent locator %d" % i,
                )

    def _hidden_quirk(self):
        f = self.footer
        if (
            f.creator_app[:3] == b"tap"
            and f.creator_version in (1, 0x00010001)
            and self.footer_at != "copy"
        ):
            copy = os.pread(self._fd, fmt.FOOTER_SIZE, 0)
            if copy[:8] == fmt.FOOTER_COOKIE:
                self.hidden = fmt.Footer.parse(copy).hidden

    # -- queries ---------------------------------------------------------------------------------

    @property
    def is_differencing(self):
        return self.footer.disk_type == fmt.DISK_DIFF

    @property
    def is_dynamic(self):
        return self.footer.disk_type != fmt.DISK_FIXED

    def parent_locators(self):
        """[(platform name, decoded path)] of the locators we can follow, in header order."""
        out = []
        if not self.is_differencing:
            return out
        for loc in self.header.locators:
            if loc.code not in (fmt.PLAT_W2KU, fmt.PLAT_W2RU, fmt.PLAT_MACX) or not loc.data_length:
                continue
            data = os.pread(self._fd, loc.data_length, loc.data_offset)
            try:
                p = fmt.decode_locator(loc.code, data)
            except ValueError:
                continue
            if p:
                out.append((loc.name, p))
        return out

    def allocated_blocks(self):
        if self.bat is None:
            return list(range(self.block_count))
        return list(self._allocated_index)

    def allocated_count(self):
        if self.bat is None:
            return self.block_count
        return len(self._allocated_index)

    def block_data_offset(self, index):
        """Byte offset of block `index`'s data area, or None if unallocated."""
        if self.bat is None:
            return index * self.block_size
        e = self.bat[index]
        if e == fmt.BAT_UNUSED:
            return None
        return e * SECTOR + self.bitmap_size

    def block_full(self, index):
        """True when the batmap says every sector of an allocated block is present."""
        bm = self.batmap
        return bm is not None and (bm[index >> 3] >> (7 - (index & 7))) & 1 == 1

    def block_bitmap(self, index):
        if self.bat is None:
            return FULL
        e = self.bat[index]
        if e == fmt.BAT_UNUSED:
            return None
        if self.batmap is not None and (self.batmap[index >> 3] >> (7 - (index & 7))) & 1:
            return FULL
        with self._lock:
            bm = self._cache.get(index)
            if bm is not None:
                self._cache.move_to_end(index)
                return bm
        bm = _pread(self._fd, self.bitmap_used, e * SECTOR, self.path, "bitmap of block %d" % index)
        with self._lock:
            self._cache[index] = bm
            limit = min(BITMAP_CACHE_ENTRIES, max(16, BITMAP_CACHE_BYTES // self.bitmap_used))
            if len(self._cache) > limit:
                self._cache.popitem(last=False)
        return bm

    def sectors_present(self, first, count):
        if self.bat is None:
            return _flat_sectors(first, count, self.size_sectors, 0)
        runs = []
        end = first + count
        size_secs = self.size_sectors
        lim = min(end, size_secs)
        spb = self.sectors_per_block
        s = first
        bat = self.bat
        unused = fmt.BAT_UNUSED
        bitmap_runs = speedups.bitmap_runs
        while s < lim:
            b = s // spb
            bstart = b * spb
            n = min(lim, bstart + spb) - s
            e = bat[b]
            if e == unused:
                # jump over the whole run of unallocated blocks (LVM BATs map 2 TiB, mostly empty)
                k = bisect.bisect_right(self._allocated_index, b)
                nxt = self._allocated_index[k] * spb if k < len(self._allocated_index) else lim
                n = min(lim, nxt) - s
                if runs and runs[-1][2] is None and runs[-1][0] + runs[-1][1] == s:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, None)
                else:
                    runs.append((s, n, None))
            else:
                data = e * SECTOR + self.bitmap_size
                bm = self.block_bitmap(b)
                if bm is FULL:
                    runs.append((s, n, data + (s - bstart) * SECTOR))
                else:
                    for rs, rn, isset in bitmap_runs(bm, s - bstart, n):
                        if isset:
                            runs.append((bstart + rs, rn, data + rs * SECTOR))
                        elif (
                            runs
                            and runs[-1][2] is None
                            and runs[-1][0] + runs[-1][1] == bstart + rs
                        ):
                            runs[-1] = (runs[-1][0], runs[-1][1] + rn, None)
                        else:
                            runs.append((bstart + rs, rn, None))
            s += n
        if end > max(first, size_secs):
            start = max(first, size_secs)
            runs.append((start, end - start, BEYOND))
        return runs

    def data_range_ok(self, offset, length):
        return offset + length <= self.data_end

    def describe(self):
        d = {
            "path": self.path,
            "type": self.footer.disk_type_name,
            "uuid": str(self.uuid),
            "size": self.size,
            "hidden": bool(self.hidden),
            "block_size": self.block_size,
            "blocks": self.block_count,
            "allocated_blocks": self.allocated_count(),
            "creator": self.footer.creator_app.decode("latin-1").rstrip("\x00"),
            "footer": self.footer_at,
            "batmap": self.batmap is not None,
        }
        if self.is_differencing:
            d["parent_uuid"] = str(self.parent_uuid)
            d["parent_name"] = self.header.parent_name
            d["parent_locators"] = [{"code": c, "path": p} for c, p in self.parent_locators()]
        return d


FOOTER_PROBE = fmt.FOOTER_SIZE


def _round_sector(n):
    return (n + SECTOR - 1) // SECTOR * SECTOR


def _entries_near(sorted_entries, start, length):
    """Allocated entries that may overlap bytes [start, start + length): the one before and all inside."""
    i = bisect.bisect_left(sorted_entries, start // SECTOR)
    if i > 0:
        i -= 1
    out = []
    stop = start + length
    while i < len(sorted_entries) and sorted_entries[i] * SECTOR < stop:
        out.append(sorted_entries[i])
        i += 1
    return out


def open_level(path, fd=None, end=None, allow_raw=True, own_fd=False):
    """A VhdFile, or a RawFile when the file carries no VHD footer at all and allow_raw is set."""
    try:
        return VhdFile.open(path, fd=fd, end=end, own_fd=own_fd)
    except NotVhd:
        if not allow_raw:
            raise
        return RawFile.open(path, fd=fd, end=end, own_fd=own_fd)
