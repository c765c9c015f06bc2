"""Writing VHDs: dynamic and differencing files written in place, and a streaming (seek-free) writer.

Files we write look like blktap's: creator "tap\\0" version 1.3, the exact current_size, a footer copy at
offset 0, the header at 512, the BAT at 1536, a batmap ("tdbatmap") after the BAT, then the parent
locators of a differencing disk, then data blocks whose data areas start on 4 KiB boundaries (the
bitmap sits just before), then the footer.
"""

import os
import uuid as uuidlib

from agent.vhd import format as fmt
from agent.vhd.errors import VhdError
from agent.vhd.file import SECTOR, open_level

PAGE = 4096


def _ceil_div(a, b):
    return (a + b - 1) // b


def _align_data(pos, bitmap_size):
    """First byte offset >= pos (a sector multiple) where bitmap + data put the data on a 4 KiB boundary."""
    pos = _ceil_div(pos, SECTOR) * SECTOR
    gap = (-(pos + bitmap_size)) % PAGE
    return pos + gap


def _check_geometry(size, block_size):
    if size <= 0 or size % SECTOR:
        raise ValueError("size %d must be a positive multiple of 512" % size)
    if size > fmt.MAX_SIZE:
        raise ValueError("size %d exceeds the VHD maximum of 2040 GiB" % size)
    if (
        block_size < fmt.MIN_BLOCK_SIZE
        or block_size > fmt.MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            "block size %d must be a power of two between 512 B and 256 MiB" % block_size
        )


def _make_footer(size, disk_type, uid, timestamp=None):
    cyl, heads, spt = fmt.chs_geometry(size)
    return fmt.Footer(
        data_offset=fmt.FOOTER_SIZE,
        timestamp=fmt.vhd_time() if timestamp is None else timestamp,
        original_size=size,
        current_size=size,
        cylinders=cyl,
        heads=heads,
        sectors_per_track=spt,
        disk_type=disk_type,
        uuid=uid or uuidlib.uuid4(),
    )


class _Metadata(object):
    """Footer, header, and the byte layout of everything before the first block."""

    def __init__(self, size, block_size, uid, parent=None, timestamp=None, max_table_entries=None):
        _check_geometry(size, block_size)
        self.size = size
        self.block_size = block_size
        self.block_count = _ceil_div(size, block_size)
        if max_table_entries is None:
            max_table_entries = self.block_count
        if max_table_entries < self.block_count or max_table_entries > 0xFFFFFFFF:
            raise ValueError(
                "max_table_entries %d cannot map %d blocks" % (max_table_entries, self.block_count)
            )
        self.table_entries = max_table_entries
        self.bitmap_size = fmt.bitmap_bytes(block_size)
        disk_type = fmt.DISK_DIFF if parent is not None else fmt.DISK_DYNAMIC
        self.footer = _make_footer(size, disk_type, uid, timestamp)
        self.table_offset = fmt.FOOTER_SIZE + fmt.HEADER_SIZE
        self.table_bytes = fmt.sectors_padded(self.table_entries * 4)
        self.batmap_header_offset = self.table_offset + self.table_bytes
        self.batmap_offset = self.batmap_header_offset + SECTOR
        self.batmap_bytes = fmt.sectors_padded(_ceil_div(self.table_entries, 8))
        pos = self.batmap_offset + self.batmap_bytes
        header = fmt.Header(
            table_offset=self.table_offset,
            max_table_entries=self.table_entries,
            block_size=block_size,
        )
        self.locator_data = []
        if parent is not None:
            # parent: dict(uuid=UUID or None for raw, name=str, timestamp=int, locators=[(code, path)])
            header.parent_uuid = parent["uuid"] or uuidlib.UUID(int=0)
            header.parent_timestamp = parent.get("timestamp", 0)
            header.parent_name_raw = fmt.Header.encode_parent_name(parent["name"])
            locs = []
            for code, path in parent["locators"]:
                payload = fmt.encode_locator(code, path)
                space = fmt.sectors_padded(len(payload))
                # blktap stores the reserved space in bytes (not sectors as the spec says); readers accept both.
                locs.append(fmt.ParentLocator(code, space, len(payload), pos))
                self.locator_data.append((pos, payload + bytes(space - len(payload))))
                pos += space
            header.locators = locs + [fmt.ParentLocator(0, 0, 0, 0) for _ in range(8 - len(locs))]
        self.header = header
        self.metadata_end = pos

    def full_bitmap(self, index):
        """Bitmap with every sector of block `index` that lies inside the disk set."""
        spb = self.block_size // SECTOR
        nsec = min(spb, _ceil_div(self.size - index * self.block_size, SECTOR))
        return _ones_bitmap(nsec, self.bitmap_size)

    def batmap_header(self, batmap):
        bh = fmt.BatmapHeader(
            fmt.BATMAP_COOKIE,
            self.batmap_offset,
            self.batmap_bytes // SECTOR,
            fmt.BATMAP_VERSION,
            fmt.batmap_checksum(batmap, fmt.BATMAP_VERSION),
            0,
        )
        return bh.build()

    def prefix(self, bat, batmap):
        """Bytes [0, metadata_end): footer copy, header, BAT, batmap header + map, locators."""
        out = bytearray(self.metadata_end)
        out[0 : fmt.FOOTER_SIZE] = self.footer.build()
        out[fmt.FOOTER_SIZE : fmt.FOOTER_SIZE + fmt.HEADER_SIZE] = self.header.build()
        table = _bat_bytes(bat, self.table_bytes)
        out[self.table_offset : self.table_offset + self.table_bytes] = table
        out[self.batmap_header_offset : self.batmap_header_offset + SECTOR] = self.batmap_header(
            batmap
        )
        out[self.batmap_offset : self.batmap_offset + self.batmap_bytes] = batmap
        for pos, payload in self.locator_data:
            out[pos : pos + len(payload)] = payload
        return bytes(out)


def _ones_bitmap(nsec, nbytes):
    bm = bytearray(nbytes)
    full, rest = divmod(nsec, 8)
    bm[:full] = b"\xff" * full
    if rest:
        bm[full] = (0xFF << (8 - rest)) & 0xFF
    return bm


def _bat_bytes(bat, padded):
    out = bytearray(b"\xff" * padded)
    for i, e in enumerate(bat):
        if e != fmt.BAT_UNUSED:
            out[i * 4 : i * 4 + 4] = e.to_bytes(4, "big")
    return out


def _set_bits(bm, first, count):
    """Set bits [first, first+count) of bytearray bm (MSB first)."""
    end = first + count
    i = first
    while i < end and i & 7:
        bm[i >> 3] |= 0x80 >> (i & 7)
        i += 1
    full_end = end & ~7
    if i < full_end:
        bm[i >> 3 : full_end >> 3] = b"\xff" * ((full_end - i) >> 3)
        i = full_end
    while i < end:
        bm[i >> 3] |= 0x80 >> (i & 7)
        i += 1


def _bit(bm, i):
    return (bm[i >> 3] >> (7 - (i & 7))) & 1


class VhdWriter(object):
    """A dynamic or differencing VHD being written in place. Use write(offset, data), then close()."""

    def __init__(self, path, meta, parent_path=None):
        self.path = path
        self.meta = meta
        self.size = meta.size
        self.block_size = meta.block_size
        self.uuid = meta.footer.uuid
        self._parent_path = parent_path
        self._parent_chain = None
        self._bat = [fmt.BAT_UNUSED] * meta.block_count
        self._bitmaps = {}
        self._next = _align_data(meta.metadata_end, meta.bitmap_size)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_metadata()
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    def _batmap(self):
        bm = bytearray(self.meta.batmap_bytes)
        spb = self.block_size // SECTOR
        for i, bitmap in self._bitmaps.items():
            if (
                all(_bit(bitmap, s) for s in range(spb))
                if spb < 8
                else bitmap[: spb // 8] == b"\xff" * (spb // 8)
            ):
                bm[i >> 3] |= 0x80 >> (i & 7)
        return bytes(bm)

    def _write_metadata(self):
        os.pwrite(self._fd, self.meta.prefix(self._bat, self._batmap()), 0)
        end = max(self._next, self.meta.metadata_end)
        for i, e in enumerate(self._bat):
            if e != fmt.BAT_UNUSED:
                os.pwrite(self._fd, bytes(self._bitmaps[i]), e * SECTOR)
        self.meta.footer.build()
        os.pwrite(self._fd, self.meta.footer.raw, end)
        os.ftruncate(self._fd, end + fmt.FOOTER_SIZE)

    def _allocate(self, index):
        pos = _align_data(self._next, self.meta.bitmap_size)
        self._bat[index] = pos // SECTOR
        self._bitmaps[index] = bytearray(self.meta.bitmap_size)
        self._next = pos + self.meta.bitmap_size + self.block_size
        return pos

    def _current_sector(self, sector):
        """Guest content of one sector as it stands (own data, else the parent's, else zeros)."""
        spb = self.block_size // SECTOR
        b, s = divmod(sector, spb)
        e = self._bat[b]
        if e != fmt.BAT_UNUSED and _bit(self._bitmaps[b], s):
            return os.pread(self._fd, SECTOR, e * SECTOR + self.meta.bitmap_size + s * SECTOR)
        if self._parent_path is not None:
            if self._parent_chain is None:
                from agent.vhd.chain import open_chain

                self._parent_chain = open_chain(self._parent_path)
            pc = self._parent_chain
            off = sector * SECTOR
            if off < pc.size:
                data = pc.read(off, min(SECTOR, pc.size - off))
                return data + bytes(SECTOR - len(data))
        return bytes(SECTOR)

    def write(self, offset, data):
        """Write guest bytes at offset (allocating blocks and setting bitmap bits as needed)."""
        data = memoryview(data).cast("B")
        length = len(data)
        if offset < 0 or offset + length > self.size:
            raise ValueError(
                "write [%d, %d) outside the disk (%d bytes)" % (offset, offset + length, self.size)
            )
        if length == 0:
            return
        head = offset % SECTOR
        tail = (offset + length) % SECTOR
        if head or tail:
            first = offset // SECTOR
            last = (offset + length - 1) // SECTOR
            buf = bytearray()
            buf += self._current_sector(first)
            if last > first + 1:
                buf += bytes((last - first - 1) * SECTOR)
            if last > first:
                buf += self._current_sector(last)
            buf[head : head + length] = data
            offset, data = first * SECTOR, memoryview(buf)
            length = len(buf)
        spb = self.block_size // SECTOR
        pos = 0
        while pos < length:
            sector = (offset + pos) // SECTOR
            b, s = divmod(sector, spb)
            n = min(spb - s, (length - pos) // SECTOR)
            e = self._bat[b]
            if e == fmt.BAT_UNUSED:
                e = self._allocate(b) // SECTOR
            os.pwrite(
                self._fd,
                data[pos : pos + n * SECTOR],
                e * SECTOR + self.meta.bitmap_size + s * SECTOR,
            )
            _set_bits(self._bitmaps[b], s, n)
            pos += n * SECTOR

    def close(self):
        if self._fd < 0:
            return
        try:
            self._write_metadata()
        finally:
            os.close(self._fd)
            self._fd = -1
            if self._parent_chain is not None:
                self._parent_chain.close()
                self._parent_chain = None


def create_dynamic(
    path, size, block_size=fmt.DEFAULT_BLOCK_SIZE, uuid=None, max_table_entries=None
):
    """Create an empty dynamic VHD of exactly `size` bytes; returns a VhdWriter (close it).

    max_table_entries: a BAT larger than the size needs, as SM makes on LVM (sized for 2 TiB)."""
    return VhdWriter(path, _Metadata(size, block_size, uuid, max_table_entries=max_table_entries))


def parent_info(parent_path, child_path):
    """Parent description for a new differencing disk: uuid (None = raw), name, timestamp, locators."""
    level = open_level(parent_path)
    try:
        st = os.fstat(level.fileno())
        abs_parent = os.path.abspath(parent_path)
        rel = os.path.relpath(abs_parent, os.path.dirname(os.path.abspath(child_path)))
        if not rel.startswith("."):
            rel = "./" + rel
        return {
            "uuid": level.uuid if level.is_vhd else None,
            "name": os.path.basename(abs_parent),
            "timestamp": fmt.vhd_time(st.st_mtime),
            "locators": [(fmt.PLAT_W2KU, rel), (fmt.PLAT_W2RU, rel), (fmt.PLAT_MACX, abs_parent)],
            "size": level.size,
            "block_size": level.block_size
            if level.is_vhd and level.footer.disk_type != fmt.DISK_FIXED
            else fmt.DEFAULT_BLOCK_SIZE,
        }
    finally:
        level.close()


def create_differencing(path, parent_path, uuid=None, size=None, block_size=None):
    """Create an empty differencing VHD on top of parent_path (a VHD, or a raw file: null parent uuid)."""
    info = parent_info(parent_path, path)
    if size is None:
        size = info["size"]
        if size % SECTOR:
            raise VhdError(
                parent_path,
                "raw parent size %d is not a multiple of 512; pass size=" % size,
                "size",
            )
    meta = _Metadata(size, block_size or info["block_size"], uuid, parent=info)
    return VhdWriter(path, meta, parent_path=parent_path)


class VhdStreamLayout(object):
    """Byte layout of a dynamic (or differencing) VHD streamed front to back without seeking.

    prefix_bytes() | for each block in ascending order: bitmap_bytes(i) at block_offset(i), block_size
    bytes of data at data_offset(i) (the last block's data padded with zeros to block_size), then `gap`
    zero bytes | suffix_bytes() (the footer) at footer_offset. Every data area starts on a 4 KiB
    boundary, as blktap lays blocks out; the gap keeps the next one aligned.
    """

    def __init__(
        self,
        size,
        block_indices,
        block_size=fmt.DEFAULT_BLOCK_SIZE,
        uuid=None,
        parent=None,
        timestamp=None,
    ):
        parent_desc = None
        if parent is not None:
            parent_desc = _stream_parent(parent)
        self.meta = _Metadata(size, block_size, uuid, parent=parent_desc, timestamp=timestamp)
        self.size = size
        self.block_size = block_size
        self.uuid = self.meta.footer.uuid
        self.blocks = sorted(set(block_indices))
        for i in self.blocks:
            if i < 0 or i >= self.meta.block_count:
                raise ValueError(
                    "block %d outside the disk (%d blocks)" % (i, self.meta.block_count)
                )
        self.bitmap_size = self.meta.bitmap_size
        self.gap = (-(self.bitmap_size + block_size)) % PAGE
        self.stride = self.bitmap_size + block_size + self.gap
        self.first_block = _align_data(self.meta.metadata_end, self.bitmap_size)
        self._slot = {b: k for k, b in enumerate(self.blocks)}
        self.footer_offset = self.first_block + len(self.blocks) * self.stride
        self.total_length = self.footer_offset + fmt.FOOTER_SIZE

    def block_offset(self, index):
        """Offset of block `index`'s bitmap in the stream."""
        return self.first_block + self._slot[index] * self.stride

    def data_offset(self, index):
        return self.block_offset(index) + self.bitmap_size

    def bitmap_bytes(self, index):
        return bytes(self.meta.full_bitmap(index))

    def prefix_bytes(self):
        bat = [fmt.BAT_UNUSED] * self.meta.block_count
        batmap = bytearray(self.meta.batmap_bytes)
        spb = self.block_size // SECTOR
        for b in self.blocks:
            bat[b] = self.block_offset(b) // SECTOR
            if (b + 1) * self.block_size <= self.size and spb >= 1:
                batmap[b >> 3] |= 0x80 >> (b & 7)
        head = self.meta.prefix(bat, bytes(batmap))
        return head + bytes(self.first_block - len(head))

    def suffix_bytes(self):
        return self.meta.footer.build()

    def chunks(self, read_block):
        """Generator of the whole stream; read_block(i) -> the guest bytes of block i."""
        yield self.prefix_bytes()
        for b in self.blocks:
            yield self.bitmap_bytes(b)
            data = read_block(b)
            yield data
            pad = self.block_size - len(data) + self.gap
            if pad:
                yield bytes(pad)
        yield self.suffix_bytes()


def _stream_parent(parent):
    """parent = (uuid or None, name[, timestamp]): locators are relative ('./name') like blktap's."""
    puuid, name = parent[0], parent[1]
    timestamp = parent[2] if len(parent) > 2 else 0
    if puuid is not None and not isinstance(puuid, uuidlib.UUID):
        puuid = uuidlib.UUID(str(puuid))
    rel = name if name.startswith((".", "/")) else "./" + name
    return {
        "uuid": puuid,
        "name": os.path.basename(name),
        "timestamp": timestamp,
        "locators": [(fmt.PLAT_W2KU, rel), (fmt.PLAT_W2RU, rel), (fmt.PLAT_MACX, rel)],
    }


class VhdStream(object):
    """Iterable of the stream's byte chunks, with total_length known up front."""

    def __init__(self, layout, read_block):
        self.layout = layout
        self.total_length = layout.total_length
        self._read_block = read_block

    def __iter__(self):
        return self.layout.chunks(self._read_block)


def stream_vhd(
    size, block_indices, read_block, block_size=fmt.DEFAULT_BLOCK_SIZE, uuid=None, parent=None
):
    """A streamed VHD: iterate it for bytes, read .total_length for Content-Length."""
    return VhdStream(
        VhdStreamLayout(size, block_indices, block_size, uuid=uuid, parent=parent), read_block
    )
