"""QCOW2 on-disk structures: header, header extensions, L1/L2 entry bits (no I/O here).

Reference: qemu's docs/interop/qcow2.txt. All integers are big-endian. A header is parsed from the
bytes of the image's first cluster (the header, its extensions and the backing file name all live
there) and checked against the file's logical end by check_header(): what it accepts has every
table it names inside the file.
"""

import struct

from agent.qcow2.errors import CorruptQcow2, UnsupportedQcow2

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9  # 512 B
MAX_CLUSTER_BITS = 21  # 2 MiB: qemu's limit, and the agent's block size (a block is whole clusters)
MAX_L1_BYTES = 32 << 20  # qemu's QCOW_MAX_L1_SIZE
MAX_BACKING_NAME = 1023
MAX_SIZE = 1 << 62  # anything above cannot be addressed by L1/L2 (56-bit host offsets) anyway

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
# SM on XCP-ng 8.3 (drivers/qcow2util.py) keeps the VDI's `hidden` flag in a header extension of
# its own: type "vate", 8 bytes, the first byte 0 or 1.
EXT_SM_HIDDEN = 0x76617465

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0

CRYPT_NONE = 0
CRYPT_NAMES = {1: "AES", 2: "LUKS"}
COMPRESSION_ZLIB = 0
COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}

# L1 / L2 entries
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
COMPRESSED_SECTOR = 512

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3 = struct.Struct(">QQQII")  # bytes 72..104
_EXT = struct.Struct(">II")


class Header(object):
    """The image header (version 2 or 3) and what its extensions say."""

    __slots__ = (
        "version",
        "backing_file_offset",
        "backing_file_size",
        "cluster_bits",
        "size",
        "crypt_method",
        "l1_size",
        "l1_table_offset",
        "refcount_table_offset",
        "refcount_table_clusters",
        "nb_snapshots",
        "snapshots_offset",
        "incompatible_features",
        "compatible_features",
        "autoclear_features",
        "refcount_order",
        "header_length",
        "compression_type",
        "extensions",
        "backing_format",
        "backing_name",
        "feature_names",
        "hidden",
    )

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, None)
        self.extensions = []
        self.feature_names = {}

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def l2_entries(self):
        return self.cluster_size // 8

    @property
    def l2_bits(self):
        return self.cluster_bits - 3

    def l1_needed(self):
        """L1 entries needed to map `size` bytes."""
        span = self.cluster_size * self.l2_entries
        return (self.size + span - 1) // span

    @property
    def dirty(self):
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    def feature_name(self, bit):
        return self.feature_names.get((0, bit), "bit %d" % bit)

    def as_dict(self):
        return {
            "version": self.version,
            "compat": "0.10" if self.version == 2 else "1.1",
            "cluster_size": self.cluster_size,
            "size": self.size,
            "l1_size": self.l1_size,
            "l1_table_offset": self.l1_table_offset,
            "refcount_order": self.refcount_order,
            "snapshots": self.nb_snapshots,
            "dirty": self.dirty,
            "lazy_refcounts": bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "backing_file": self.backing_name,
            "backing_format": self.backing_format,
        }


def first_cluster_size(path, head):
    """The cluster size from an image's first 24 bytes (to know how much to read for
    parse_header); typed errors for a wrong magic or an impossible cluster size."""
    if head[:4] != MAGIC:
        raise CorruptQcow2(path, "magic %r instead of 'QFI\\xfb'" % bytes(head[:4]), "header magic")
    if len(head) < 24:
        raise CorruptQcow2(path, "file too short (%d bytes) for a header" % len(head), "header")
    (bits,) = struct.unpack_from(">I", head, 20)
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise UnsupportedQcow2(
            path, "%d (cluster sizes of 512 B to 2 MiB only)" % bits, "cluster_bits"
        )
    return 1 << bits


def parse_header(path, data):
    """A Header from the image's first bytes (at least the 72/104-byte header, ideally the whole
    first cluster for the extensions and the backing name). Typed errors; no bounds check
    against the file (check_header does that)."""
    data = bytes(data)
    if data[:4] != MAGIC:
        raise CorruptQcow2(path, "magic %r instead of 'QFI\\xfb'" % data[:4], "header magic")
    if len(data) < V2_HEADER_LENGTH:
        raise CorruptQcow2(path, "file too short (%d bytes) for a header" % len(data), "header")
    h = Header()
    (
        _magic,
        h.version,
        h.backing_file_offset,
        h.backing_file_size,
        h.cluster_bits,
        h.size,
        h.crypt_method,
        h.l1_size,
        h.l1_table_offset,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.nb_snapshots,
        h.snapshots_offset,
    ) = _HEADER_V2.unpack_from(data)
    if h.version not in (2, 3):
        raise UnsupportedQcow2(path, "version %d (only 2 and 3)" % h.version, "version")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise UnsupportedQcow2(
            path,
            "%d (cluster sizes of 512 B to 2 MiB only)" % h.cluster_bits,
            "cluster_bits",
        )
    if h.version == 2:
        h.incompatible_features = h.compatible_features = h.autoclear_features = 0
        h.refcount_order = 4
        h.header_length = V2_HEADER_LENGTH
        h.compression_type = COMPRESSION_ZLIB
    else:
        if len(data) < V3_HEADER_LENGTH:
            raise CorruptQcow2(path, "file too short for a version 3 header", "header")
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        ) = _HEADER_V3.unpack_from(data, V2_HEADER_LENGTH)
        if (
            h.header_length < V3_HEADER_LENGTH
            or h.header_length % 8
            or h.header_length > min(len(data), h.cluster_size)
        ):
            raise CorruptQcow2(
                path,
                "%d (a multiple of 8, at least 104, inside the first cluster)" % h.header_length,
                "header_length",
            )
        h.compression_type = data[104] if h.header_length > 104 else COMPRESSION_ZLIB
    _parse_extensions(path, h, data)
    if h.backing_file_offset:
        off, n = h.backing_file_offset, h.backing_file_size
        if n == 0 or n > MAX_BACKING_NAME:
            raise CorruptQcow2(path, "%d bytes (1 to 1023)" % n, "backing_file_size")
        if off + n > min(len(data), h.cluster_size):
            raise CorruptQcow2(
                path,
                "name of %d bytes at offset %d is not inside the first cluster" % (n, off),
                "backing_file_offset",
            )
        try:
            h.backing_name = data[off : off + n].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptQcow2(
                path, "backing file name is not UTF-8", "backing_file_offset"
            ) from None
        if "\x00" in h.backing_name:
            raise CorruptQcow2(path, "backing file name holds a NUL", "backing_file_offset")
    return h


def _parse_extensions(path, h, data):
    limit = min(len(data), h.cluster_size)
    if h.backing_file_offset and h.backing_file_offset < limit:
        limit = max(h.backing_file_offset, h.header_length)
    pos = h.header_length
    while pos + _EXT.size <= limit:
        kind, length = _EXT.unpack_from(data, pos)
        if kind == EXT_END:
            return
        start = pos + _EXT.size
        if start + length > limit:
            raise CorruptQcow2(
                path,
                "extension 0x%08x of %d bytes at offset %d runs past the header area (%d)"
                % (kind, length, pos, limit),
                "header extension",
            )
        body = data[start : start + length]
        h.extensions.append((kind, length))
        if kind == EXT_BACKING_FORMAT:
            h.backing_format = body.decode("ascii", "replace")
        elif kind == EXT_FEATURE_NAMES:
            for i in range(0, length - 47, 48):
                name = body[i + 2 : i + 48].split(b"\x00", 1)[0].decode("ascii", "replace")
                h.feature_names[(body[i], body[i + 1])] = name
        elif kind == EXT_SM_HIDDEN and length >= 1:
            h.hidden = body[0]
        pos = start + (length + 7) // 8 * 8


def check_header(path, h, end):
    """Refuse what the agent does not read and anything that points outside `end` bytes."""
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        bits = [i for i in range(64) if unknown >> i & 1]
        raise UnsupportedQcow2(
            path,
            "unknown feature(s) %s" % ", ".join(h.feature_name(b) for b in bits),
            "incompatible_features",
        )
    if h.incompatible_features & INCOMPAT_CORRUPT:
        raise CorruptQcow2(
            path,
            "the image is marked corrupt (qemu-img check -r all repairs it)",
            "incompatible_features",
        )
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        raise UnsupportedQcow2(
            path,
            "the guest data lives in an external data file (not supported)",
            "incompatible_features",
        )
    if h.incompatible_features & INCOMPAT_EXTL2:
        raise UnsupportedQcow2(
            path,
            "extended L2 entries (subclusters) are not supported",
            "incompatible_features",
        )
    if h.compression_type != COMPRESSION_ZLIB or h.incompatible_features & INCOMPAT_COMPRESSION:
        raise UnsupportedQcow2(
            path,
            "%s compression (only zlib)"
            % COMPRESSION_NAMES.get(h.compression_type, "type %d" % h.compression_type),
            "compression_type",
        )
    if h.crypt_method != CRYPT_NONE:
        raise UnsupportedQcow2(
            path,
            "the image is encrypted (%s); encrypted images are not supported"
            % CRYPT_NAMES.get(h.crypt_method, "method %d" % h.crypt_method),
            "crypt_method",
        )
    if h.refcount_order > 6:
        raise CorruptQcow2(path, "%d (at most 6)" % h.refcount_order, "refcount_order")
    if h.size > MAX_SIZE:
        raise CorruptQcow2(path, "%d bytes is absurd" % h.size, "size")
    cs = h.cluster_size
    need = h.l1_needed()
    if need * 8 > MAX_L1_BYTES:
        raise UnsupportedQcow2(
            path,
            "%d bytes needs an L1 table of %d entries (more than qemu's 32 MiB)" % (h.size, need),
            "size",
        )
    if h.l1_size < need:
        raise CorruptQcow2(
            path,
            "%d entries cannot map %d bytes with %d-byte clusters" % (h.l1_size, h.size, cs),
            "l1_size",
        )
    if h.l1_table_offset % cs or (need and h.l1_table_offset == 0):
        raise CorruptQcow2(
            path,
            "%d is not a cluster-aligned offset" % h.l1_table_offset,
            "l1_table_offset",
        )
    if need and h.l1_table_offset + need * 8 > end:
        raise CorruptQcow2(
            path,
            "table of %d entries at offset %d does not fit in the file (%d bytes)"
            % (need, h.l1_table_offset, end),
            "l1_table_offset",
        )
    if h.backing_name is not None and h.backing_format not in (None, "qcow2", "raw"):
        raise UnsupportedQcow2(
            path,
            "backing file %s has format %r (only qcow2 and raw)"
            % (h.backing_name, h.backing_format),
            "backing format",
        )


def compressed_extent(entry, cluster_bits):
    """(host offset, bytes) of a compressed cluster's data, from its L2 entry."""
    shift = 62 - (cluster_bits - 8)
    offset = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * COMPRESSED_SECTOR - (offset & (COMPRESSED_SECTOR - 1))
