"""A small read-write VHD file for the simulated SR: what tapdisk and vhd-util do to a file SR's VHDs.

agent.vhd reads chains and writes new files; a host also has to write into an existing leaf (guest I/O),
mark a VHD hidden, re-point a child at a new parent (SM's relink after coalesce) and coalesce a child's
sectors into its parent. Those pieces live here, on top of agent.vhd.format's footer/header structures,
so the agent's own reader stays an independent judge of what hostsim writes.

Layout written (blktap-like): footer copy at 0, header at 512, BAT at 1536, parent locators, then
blocks (sector bitmap then data, data on a 4 KiB boundary), then the footer. Creator "tap\\0".
"""

import os
import struct
import uuid as uuidlib

from agent import speedups
from agent.vhd import format as fmt

SECTOR = 512
PAGE = 4096


class VhdFileError(Exception):
    def __init__(self, path, message):
        super().__init__("%s: %s" % (path, message))
        self.path = path


def _footer(size, disk_type, uid):
    cyl, heads, spt = fmt.chs_geometry(size)
    return fmt.Footer(
        data_offset=fmt.FOOTER_SIZE,
        original_size=size,
        current_size=size,
        cylinders=cyl,
        heads=heads,
        sectors_per_track=spt,
        disk_type=disk_type,
        uuid=uid,
    )


def locators_for(parent_name):
    """XCP-ng file SR locators: a relative ./<uuid>.vhd as MacX, W2ku and W2ru."""
    rel = "./" + parent_name
    return [(fmt.PLAT_MACX, rel), (fmt.PLAT_W2KU, rel), (fmt.PLAT_W2RU, rel)]


def create(path, size, block_size=fmt.DEFAULT_BLOCK_SIZE, uid=None, parent=None):
    """Create an empty dynamic VHD, or a differencing one when parent=VhdFile is given."""
    if size <= 0 or size % SECTOR:
        raise VhdFileError(path, "size %d is not a positive multiple of 512" % size)
    uid = uid or uuidlib.uuid4()
    if isinstance(uid, str):
        uid = uuidlib.UUID(uid)
    blocks = (size + block_size - 1) // block_size
    footer = _footer(size, fmt.DISK_DIFF if parent else fmt.DISK_DYNAMIC, uid)
    table_offset = fmt.FOOTER_SIZE + fmt.HEADER_SIZE
    table_bytes = fmt.sectors_padded(blocks * 4)
    header = fmt.Header(table_offset=table_offset, max_table_entries=blocks, block_size=block_size)
    pos = table_offset + table_bytes
    loc_data = []
    if parent is not None:
        pos = _set_parent_fields(header, parent, pos, loc_data)
    pos = (pos + PAGE - 1) // PAGE * PAGE
    with open(path, "xb") as f:
        f.write(footer.build())
        f.write(header.build())
        f.write(b"\xff" * (blocks * 4) + b"\x00" * (table_bytes - blocks * 4))
        for off, payload in loc_data:
            f.seek(off)
            f.write(payload)
        f.seek(pos)
        f.write(footer.build())
    return VhdFile(path, writable=True)


def _set_parent_fields(header, parent, pos, loc_data):
    name = os.path.basename(parent.path)
    header.parent_uuid = parent.footer.uuid
    header.parent_timestamp = parent.footer.timestamp
    header.parent_name_raw = fmt.Header.encode_parent_name(name)
    locs = []
    for code, text in locators_for(name):
        payload = fmt.encode_locator(code, text)
        space = fmt.sectors_padded(len(payload))
        locs.append(fmt.ParentLocator(code, space, len(payload), pos))
        loc_data.append((pos, payload + bytes(space - len(payload))))
        pos += space
    header.locators = locs + [fmt.ParentLocator(0, 0, 0, 0) for _ in range(8 - len(locs))]
    return pos


class VhdFile:
    """One dynamic or differencing VHD file, opened for reading or writing."""

    def __init__(self, path, writable=False):
        self.path = path
        self.f = open(path, "r+b" if writable else "rb")
        self.writable = writable
        try:
            self._load()
        except Exception:
            self.f.close()
            raise

    def _load(self):
        end = os.fstat(self.f.fileno()).st_size
        if end < fmt.FOOTER_SIZE * 2 + fmt.HEADER_SIZE:
            raise VhdFileError(self.path, "too small for a VHD")
        self.footer = fmt.Footer.parse(self._pread(end - fmt.FOOTER_SIZE, fmt.FOOTER_SIZE))
        if self.footer.cookie != fmt.FOOTER_COOKIE:
            raise VhdFileError(self.path, "no VHD footer")
        if self.footer.disk_type not in (fmt.DISK_DYNAMIC, fmt.DISK_DIFF):
            raise VhdFileError(self.path, "not a dynamic/differencing VHD")
        self.header = fmt.Header.parse(self._pread(self.footer.data_offset, fmt.HEADER_SIZE))
        if self.header.cookie != fmt.HEADER_COOKIE:
            raise VhdFileError(self.path, "bad dynamic header cookie")
        self.size = self.footer.current_size
        self.block_size = self.header.block_size
        self.spb = self.block_size // SECTOR
        self.bitmap_size = fmt.bitmap_bytes(self.block_size)
        n = self.header.max_table_entries
        raw = self._pread(self.header.table_offset, n * 4)
        self.bat = list(struct.unpack(">%dI" % n, raw))
        # Where the next block goes: after the last block, else after the metadata.
        ends = [
            e * SECTOR + self.bitmap_size + self.block_size for e in self.bat if e != fmt.BAT_UNUSED
        ]
        meta_end = self.header.table_offset + fmt.sectors_padded(n * 4)
        for loc in self.header.locators:
            if loc.code != fmt.PLAT_NONE:
                meta_end = max(meta_end, loc.data_offset + loc.space_bytes())
        self.data_end = max(ends + [meta_end])
        self.footer_offset = end - fmt.FOOTER_SIZE

    def _pread(self, offset, length):
        data = os.pread(self.f.fileno(), length, offset)
        if len(data) != length:
            raise VhdFileError(self.path, "short read at %d" % offset)
        return data

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def uuid(self):
        return str(self.footer.uuid)

    @property
    def parent_uuid(self):
        if self.footer.disk_type != fmt.DISK_DIFF:
            return None
        return str(self.header.parent_uuid)

    @property
    def hidden(self):
        return bool(self.footer.hidden)

    @property
    def blocks(self):
        return len(self.bat)

    def physical_size(self):
        return os.fstat(self.f.fileno()).st_size

    def allocated(self):
        return [i for i, e in enumerate(self.bat) if e != fmt.BAT_UNUSED]

    def bitmap(self, index):
        """The sector bitmap of block index (bytes), or None when the block is absent."""
        e = self.bat[index]
        if e == fmt.BAT_UNUSED:
            return None
        return self._pread(e * SECTOR, self.bitmap_size)

    def read_sectors(self, index, first, count):
        e = self.bat[index]
        return self._pread(e * SECTOR + self.bitmap_size + first * SECTOR, count * SECTOR)

    # -- writing -------------------------------------------------------------------------------

    def _write_footer(self):
        data = self.footer.build()
        if self.data_end > self.footer_offset:
            self.footer_offset = (self.data_end + SECTOR - 1) // SECTOR * SECTOR
        os.pwrite(self.f.fileno(), data, self.footer_offset)
        os.ftruncate(self.f.fileno(), self.footer_offset + fmt.FOOTER_SIZE)
        os.pwrite(self.f.fileno(), data, 0)

    def _allocate(self, index):
        pos = (self.data_end + SECTOR - 1) // SECTOR * SECTOR
        pos += (-(pos + self.bitmap_size)) % PAGE
        self.bat[index] = pos // SECTOR
        old_size = self.physical_size()
        os.pwrite(self.f.fileno(), bytes(self.bitmap_size), pos)
        self.data_end = pos + self.bitmap_size + self.block_size
        # The new data area must read as zeros (blktap zeroes new blocks; qemu-img ignores bitmaps):
        # clear what overlaps old bytes (the old footer), extend the rest sparsely.
        stale_end = min(old_size, self.data_end)
        if stale_end > pos + self.bitmap_size:
            os.pwrite(
                self.f.fileno(), bytes(stale_end - pos - self.bitmap_size), pos + self.bitmap_size
            )
        if old_size < self.data_end:
            os.ftruncate(self.f.fileno(), self.data_end)
        os.pwrite(
            self.f.fileno(),
            struct.pack(">I", self.bat[index]),
            self.header.table_offset + 4 * index,
        )

    def write(self, offset, data):
        """Write sector-aligned data at offset, allocating blocks and setting bitmap bits."""
        if not self.writable:
            raise VhdFileError(self.path, "opened read-only")
        if offset % SECTOR or len(data) % SECTOR:
            raise VhdFileError(self.path, "unaligned write %d+%d" % (offset, len(data)))
        if offset + len(data) > self.size:
            raise VhdFileError(self.path, "write %d+%d beyond %d" % (offset, len(data), self.size))
        view = memoryview(data)
        pos = 0
        grew = False
        while pos < len(view):
            abs_off = offset + pos
            index = abs_off // self.block_size
            within = abs_off - index * self.block_size
            n = min(len(view) - pos, self.block_size - within)
            if self.bat[index] == fmt.BAT_UNUSED:
                self._allocate(index)
                grew = True
            base = self.bat[index] * SECTOR
            os.pwrite(self.f.fileno(), view[pos : pos + n], base + self.bitmap_size + within)
            bm = bytearray(self._pread(base, self.bitmap_size))
            _set_bits(bm, within // SECTOR, n // SECTOR)
            os.pwrite(self.f.fileno(), bm, base)
            pos += n
        if grew:
            self._write_footer()

    def set_hidden(self, hidden):
        self.footer.hidden = 1 if hidden else 0
        self._write_footer()

    def set_uuid(self, uid):
        self.footer.uuid = uuidlib.UUID(str(uid))
        self._write_footer()

    def set_parent(self, parent):
        """Re-point this differencing VHD at another parent (vhd-util modify -p)."""
        loc_data = []
        old_end = 0
        for loc in self.header.locators:
            if loc.code != fmt.PLAT_NONE:
                old_end = max(old_end, loc.data_offset + loc.space_bytes())
        first = min(
            [loc.data_offset for loc in self.header.locators if loc.code != fmt.PLAT_NONE]
            or [self.header.table_offset + fmt.sectors_padded(len(self.bat) * 4)]
        )
        end = _set_parent_fields(self.header, parent, first, loc_data)
        if end > max(old_end, first) and end > self._first_block_offset():
            raise VhdFileError(self.path, "no room for the new parent locators")
        for off, payload in loc_data:
            os.pwrite(self.f.fileno(), payload, off)
        os.pwrite(self.f.fileno(), self.header.build(), self.footer.data_offset)

    def _first_block_offset(self):
        used = [e * SECTOR for e in self.bat if e != fmt.BAT_UNUSED]
        return min(used) if used else self.data_end + PAGE

    def flush(self):
        self.f.flush()
        os.fsync(self.f.fileno())


def _set_bits(bm, first, count):
    i = first
    end = first + count
    while i < end and i % 8:
        bm[i >> 3] |= 0x80 >> (i & 7)
        i += 1
    while i + 8 <= end:
        bm[i >> 3] = 0xFF
        i += 8
    while i < end:
        bm[i >> 3] |= 0x80 >> (i & 7)
        i += 1


def chain_read(files, offset, length, block_size):
    """Read [offset, offset+length) through a chain of VhdFile, leaf first (sector granularity)."""
    out = bytearray(length)
    pos = 0
    while pos < length:
        abs_off = offset + pos
        index = abs_off // block_size
        within = abs_off - index * block_size
        n = min(length - pos, block_size - within)
        _fill_block(files, index, within, n, memoryview(out)[pos : pos + n])
        pos += n
    return bytes(out)


def _fill_block(files, index, within, n, dest):
    """Copy block bytes [within, within+n) into dest, each sector from the topmost file having it
    (what tapdisk does for a read through a chain); sectors no file has read as zeros."""
    first = within // SECTOR
    count = (within + n + SECTOR - 1) // SECTOR - first
    head = within - first * SECTOR
    buf = bytearray(count * SECTOR)
    taken = None
    for vf in files:
        if index >= len(vf.bat) or index * vf.block_size >= vf.size:
            continue
        bm = vf.bitmap(index)
        if bm is None:
            continue
        if taken is None:
            taken = bytearray(len(bm))
        mine = speedups.bitmap_claim(bm, taken)
        for start, run, is_set in speedups.bitmap_runs(mine, first, count):
            if is_set:
                pos = (start - first) * SECTOR
                buf[pos : pos + run * SECTOR] = vf.read_sectors(index, start, run)
        if speedups.bitmap_count(taken, first, count) == count:
            break
    dest[:] = buf[head : head + n]
