"""VHD on-disk structures: footer, dynamic header, parent locators, batmap header (no I/O here).

Layout references: the Microsoft VHD specification and blktap's vhd.h / libvhd.c (what XCP-ng writes).
All integers are big-endian. Checksums are the one's complement of the byte sum of the structure with
its checksum field zeroed.
"""

import struct
import time
import uuid as uuidlib

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
POISON_COOKIE = b"v_poison"
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"
QCOW2_MAGIC = b"QFI\xfb"
BAT_UNUSED = 0xFFFFFFFF
NO_OFFSET = 0xFFFFFFFFFFFFFFFF

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFF = 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFF: "differencing"}

# The VHD format's limit: 2040 GiB (XCP-ng puts bigger disks in QCOW2).
MAX_SIZE = 2040 * (1 << 30)
MIN_BLOCK_SIZE = SECTOR
MAX_BLOCK_SIZE = 256 * (1 << 20)
DEFAULT_BLOCK_SIZE = 2 * (1 << 20)

PLAT_NONE = 0
PLAT_WI2R = 0x57693272
PLAT_WI2K = 0x5769326B
PLAT_W2RU = 0x57327275
PLAT_W2KU = 0x57326B75
PLAT_MAC = 0x4D616320
PLAT_MACX = 0x4D616358
PLATFORM_NAMES = {
    PLAT_WI2R: "Wi2r",
    PLAT_WI2K: "Wi2k",
    PLAT_W2RU: "W2ru",
    PLAT_W2KU: "W2ku",
    PLAT_MAC: "Mac ",
    PLAT_MACX: "MacX",
}
# Longest parent locator we read (a path); anything longer is corrupt.
MAX_LOCATOR_BYTES = 64 * 1024

# Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH = 946684800

# blktap writes creator "tap\0" version 1.3 (big-endian bitmaps, batmap v1.2).
CREATOR_TAP = b"tap\x00"
TAP_VERSION = 0x00010003
BATMAP_VERSION = 0x00010002

_FOOTER = struct.Struct(">8sIIQI4sII QQ I I I 16s B B")
_HEADER = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">IIIIQ")
_BATMAP_HEADER = struct.Struct(">8sQIIIB")


def checksum(data, skip_at, skip_len=4):
    """One's complement of the byte sum of data, bytes [skip_at, skip_at + skip_len) counted as zero."""
    total = sum(data) - sum(data[skip_at : skip_at + skip_len])
    return (~total) & 0xFFFFFFFF


def batmap_checksum(data, version):
    """blktap's batmap checksum; version 1.1 summed signed chars."""
    if version == 0x00010001:
        total = sum(b - 256 if b > 127 else b for b in data)
    else:
        total = sum(data)
    return (~total) & 0xFFFFFFFF


def vhd_time(unix_time=None):
    if unix_time is None:
        unix_time = time.time()
    return int(unix_time - VHD_EPOCH) & 0xFFFFFFFF


def chs_geometry(size):
    """(cylinders, heads, sectors per track) of the VHD specification's CHS algorithm."""
    secs = max((size + SECTOR - 1) // SECTOR, 1)
    secs = min(secs, 65535 * 16 * 255)
    if secs >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = secs // spt
    else:
        spt = 17
        cth = secs // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = secs // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = secs // spt
    return (cth // heads, heads, spt)


def sectors_padded(nbytes):
    """Bytes of nbytes rounded up to whole sectors, at least one sector (blktap's vhd_bytes_padded)."""
    return max((nbytes + SECTOR - 1) // SECTOR, 1) * SECTOR


def bitmap_bytes(block_size):
    """On-disk size of a block's sector bitmap (one bit per sector, padded to whole sectors)."""
    return sectors_padded((block_size // SECTOR + 7) // 8)


class Footer(object):
    """The 512-byte footer (also the copy at offset 0 of dynamic disks)."""

    __slots__ = (
        "cookie",
        "features",
        "version",
        "data_offset",
        "timestamp",
        "creator_app",
        "creator_version",
        "creator_os",
        "original_size",
        "current_size",
        "cylinders",
        "heads",
        "sectors_per_track",
        "disk_type",
        "checksum",
        "uuid",
        "saved_state",
        "hidden",
        "raw",
    )

    def __init__(self, **kw):
        self.cookie = FOOTER_COOKIE
        self.features = 2
        self.version = 0x00010000
        self.data_offset = NO_OFFSET
        self.timestamp = vhd_time()
        self.creator_app = CREATOR_TAP
        self.creator_version = TAP_VERSION
        self.creator_os = 0
        self.original_size = 0
        self.current_size = 0
        self.cylinders, self.heads, self.sectors_per_track = 0, 0, 0
        self.disk_type = DISK_DYNAMIC
        self.checksum = 0
        self.uuid = uuidlib.uuid4()
        self.saved_state = 0
        self.hidden = 0
        self.raw = None
        for k, v in kw.items():
            setattr(self, k, v)

    @classmethod
    def parse(cls, data):
        """Parse 512 (or 511, short footer) bytes. No validation beyond the layout."""
        if len(data) < FOOTER_SIZE:
            data = bytes(data) + bytes(FOOTER_SIZE - len(data))
        data = bytes(data[:FOOTER_SIZE])
        f = _FOOTER.unpack_from(data)
        geometry = f[10]
        return cls(
            cookie=f[0],
            features=f[1],
            version=f[2],
            data_offset=f[3],
            timestamp=f[4],
            creator_app=f[5],
            creator_version=f[6],
            creator_os=f[7],
            original_size=f[8],
            current_size=f[9],
            cylinders=geometry >> 16,
            heads=(geometry >> 8) & 0xFF,
            sectors_per_track=geometry & 0xFF,
            disk_type=f[11],
            checksum=f[12],
            uuid=uuidlib.UUID(bytes=f[13]),
            saved_state=f[14],
            hidden=f[15],
            raw=data,
        )

    def computed_checksum(self):
        return checksum(self.raw, 64)

    def checksum_ok(self):
        if self.computed_checksum() == self.checksum:
            return True
        # Early blktap did not recompute the checksum when it marked a VHD hidden.
        if (
            self.hidden
            and self.creator_app[:3] == b"tap"
            and self.creator_version in (1, 0x00010001)
        ):
            raw = bytearray(self.raw)
            raw[85] = 0
            return checksum(raw, 64) == self.checksum
        return False

    def build(self):
        geometry = (self.cylinders << 16) | (self.heads << 8) | self.sectors_per_track
        data = bytearray(FOOTER_SIZE)
        _FOOTER.pack_into(
            data,
            0,
            self.cookie,
            self.features,
            self.version,
            self.data_offset,
            self.timestamp,
            self.creator_app,
            self.creator_version,
            self.creator_os,
            self.original_size,
            self.current_size,
            geometry,
            self.disk_type,
            0,
            self.uuid.bytes,
            self.saved_state,
            self.hidden,
        )
        self.checksum = checksum(data, 64)
        struct.pack_into(">I", data, 64, self.checksum)
        self.raw = bytes(data)
        return self.raw

    @property
    def disk_type_name(self):
        return DISK_TYPE_NAMES.get(self.disk_type, "type %d" % self.disk_type)

    def as_dict(self):
        return {
            "cookie": self.cookie.decode("latin-1"),
            "disk_type": self.disk_type_name,
            "current_size": self.current_size,
            "original_size": self.original_size,
            "geometry": [self.cylinders, self.heads, self.sectors_per_track],
            "creator_app": self.creator_app.decode("latin-1"),
            "creator_version": "%d.%d"
            % (self.creator_version >> 16, self.creator_version & 0xFFFF),
            "timestamp": self.timestamp,
            "uuid": str(self.uuid),
            "saved_state": self.saved_state,
            "hidden": self.hidden,
        }


class ParentLocator(object):
    __slots__ = ("code", "data_space", "data_length", "data_offset")

    def __init__(self, code, data_space, data_length, data_offset):
        self.code = code
        self.data_space = data_space
        self.data_length = data_length
        self.data_offset = data_offset

    @property
    def name(self):
        return PLATFORM_NAMES.get(self.code, "0x%08x" % self.code)

    def space_bytes(self):
        """Reserved bytes. The spec says sectors; blktap and Windows often store bytes (blktap's rule)."""
        if self.data_space < 512:
            return self.data_space * SECTOR
        if self.data_space % 512 == 0:
            return self.data_space
        return 0

    def __repr__(self):
        return "ParentLocator(%s, space=%d, len=%d, off=%d)" % (
            self.name,
            self.data_space,
            self.data_length,
            self.data_offset,
        )


class Header(object):
    """The 1024-byte dynamic disk header."""

    __slots__ = (
        "cookie",
        "data_offset",
        "table_offset",
        "version",
        "max_table_entries",
        "block_size",
        "checksum",
        "parent_uuid",
        "parent_timestamp",
        "parent_name_raw",
        "locators",
        "raw",
    )

    def __init__(self, **kw):
        self.cookie = HEADER_COOKIE
        self.data_offset = NO_OFFSET
        self.table_offset = 0
        self.version = 0x00010000
        self.max_table_entries = 0
        self.block_size = DEFAULT_BLOCK_SIZE
        self.checksum = 0
        self.parent_uuid = uuidlib.UUID(int=0)
        self.parent_timestamp = 0
        self.parent_name_raw = bytes(512)
        self.locators = [ParentLocator(0, 0, 0, 0) for _ in range(8)]
        self.raw = None
        for k, v in kw.items():
            setattr(self, k, v)

    @classmethod
    def parse(cls, data):
        data = bytes(data[:HEADER_SIZE])
        h = _HEADER.unpack_from(data)
        locators = []
        for i in range(8):
            code, space, length, _reserved, offset = _LOCATOR.unpack_from(data, 576 + 24 * i)
            locators.append(ParentLocator(code, space, length, offset))
        return cls(
            cookie=h[0],
            data_offset=h[1],
            table_offset=h[2],
            version=h[3],
            max_table_entries=h[4],
            block_size=h[5],
            checksum=h[6],
            parent_uuid=uuidlib.UUID(bytes=h[7]),
            parent_timestamp=h[8],
            parent_name_raw=h[10],
            locators=locators,
            raw=data,
        )

    def computed_checksum(self):
        return checksum(self.raw, 36)

    @property
    def parent_name(self):
        """The parent's unicode name (UTF-16BE, NUL padded)."""
        raw = self.parent_name_raw
        end = len(raw)
        for i in range(0, len(raw) - 1, 2):
            if raw[i] == 0 and raw[i + 1] == 0:
                end = i
                break
        return raw[:end].decode("utf-16-be", "replace")

    @staticmethod
    def encode_parent_name(name):
        data = name.encode("utf-16-be")[:512]
        return data + bytes(512 - len(data))

    def build(self):
        data = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            data,
            0,
            self.cookie,
            self.data_offset,
            self.table_offset,
            self.version,
            self.max_table_entries,
            self.block_size,
            0,
            self.parent_uuid.bytes,
            self.parent_timestamp,
            0,
            self.parent_name_raw,
        )
        for i, loc in enumerate(self.locators):
            _LOCATOR.pack_into(
                data, 576 + 24 * i, loc.code, loc.data_space, loc.data_length, 0, loc.data_offset
            )
        self.checksum = checksum(data, 36)
        struct.pack_into(">I", data, 36, self.checksum)
        self.raw = bytes(data)
        return self.raw

    def as_dict(self):
        return {
            "table_offset": self.table_offset,
            "max_table_entries": self.max_table_entries,
            "block_size": self.block_size,
            "parent_uuid": str(self.parent_uuid),
            "parent_timestamp": self.parent_timestamp,
            "parent_name": self.parent_name,
            "locators": [
                {"code": loc.name, "offset": loc.data_offset, "length": loc.data_length}
                for loc in self.locators
                if loc.code != PLAT_NONE
            ],
        }


class BatmapHeader(object):
    """blktap's batmap header ('tdbatmap'), one sector right after the BAT."""

    __slots__ = (
        "cookie",
        "batmap_offset",
        "batmap_size",
        "version",
        "checksum",
        "marker",
        "keyhash_cookie",
    )

    def __init__(
        self, cookie, batmap_offset, batmap_size, version, checksum, marker, keyhash_cookie=0
    ):
        self.cookie = cookie
        self.batmap_offset = batmap_offset
        self.batmap_size = batmap_size  # sectors
        self.version = version
        self.checksum = checksum
        self.marker = marker
        # blktap: struct vhd_keyhash {u8 cookie; u8 nonce[32]; u8 hash[32]} follows the marker byte;
        # a cookie of 1 means the disk is encrypted with a key whose hash is stored there.
        self.keyhash_cookie = keyhash_cookie

    @classmethod
    def parse(cls, data):
        fields = _BATMAP_HEADER.unpack_from(data)
        keyhash_cookie = data[_BATMAP_HEADER.size] if len(data) > _BATMAP_HEADER.size else 0
        return cls(*fields, keyhash_cookie=keyhash_cookie)

    def build(self):
        data = bytearray(SECTOR)
        _BATMAP_HEADER.pack_into(
            data,
            0,
            BATMAP_COOKIE,
            self.batmap_offset,
            self.batmap_size,
            self.version,
            self.checksum,
            self.marker,
        )
        return bytes(data)


def encode_locator(code, path):
    """Parent locator payload for a path. W2ku/W2ru: UTF-16LE with backslashes; MacX: UTF-8 file URL."""
    if code == PLAT_MACX:
        return ("file://" + path).encode("utf-8")
    if code in (PLAT_W2KU, PLAT_W2RU):
        if not path.startswith("/"):
            if path.startswith("./"):
                path = path[2:]
            path = ".\\" + path
        return path.replace("/", "\\").encode("utf-16-le")
    raise ValueError("cannot encode locator code 0x%08x" % code)


def decode_locator(code, data):
    """Path from a locator payload, or None for a code we do not follow. Raises ValueError if garbled."""
    if code == PLAT_MACX:
        text = data.decode("utf-8").rstrip("\x00")
        if not text.startswith("file://"):
            raise ValueError("MacX locator is not a file:// URL")
        text = text[len("file://") :]
        if text.startswith("localhost/"):
            text = text[len("localhost") :]
        return _unquote(text)
    if code in (PLAT_W2KU, PLAT_W2RU):
        if len(data) % 2:
            data = data[:-1]
        text = data.decode("utf-16-le").rstrip("\x00").replace("\\", "/")
        if text[:2] in ("C:", "c:"):
            text = text[2:]
        return text
    return None


def _unquote(text):
    try:
        from urllib.parse import unquote
    except ImportError:  # pragma: no cover
        return text
    return unquote(text)
