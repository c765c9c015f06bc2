"""Index of one disk backup: one 32-byte chunk digest per chunk of the virtual disk.

Object layout (big-endian)::

    magic        8s  b"FPINDEX\\0"
    version      u16 1
    flags        u16 0
    header_size  u32 size of everything before the entries (fixed part + base key + checksum)
    disk_uuid    16s the VDI uuid
    virtual_size u64 bytes
    chunk_size   u32 bytes (2 MiB)
    entry_count  u64 ceil(virtual_size / chunk_size)
    body_blake3  32s BLAKE3 of the entries
    base_len     u16 then base_len bytes: the key of the base index (UTF-8), or nothing
    header_blake3 32s BLAKE3 of every header byte before it
    entries      entry_count * 32 bytes (ZERO_DIGEST = an all-zero chunk)

32 bytes per 2 MiB chunk: 16 MiB per TiB. ``decode`` checks magic, version, both checksums, the
count against the sizes and the exact length, so a damaged index is refused, never half-trusted.

Version 2 (encrypted repositories of format 2) has the same layout, but both checksums are keyed
BLAKE3 under the repository's index key (:class:`IndexAuth`), and the header's also covers a
*binding*: the VM uuid, VDI and restore point time the index is stored under (from its key,
``backups/<vm>/<vdi>/<time>.index``). So an index with an entry spliced, moved to another VM or
disk, or replayed under another restore point fails (IndexTampered), and so does a version 1
index where version 2 is expected. Without the key (metadata work on an encrypted repository)
an index is parsed with :data:`UNVERIFIED`: structure checked, checksums not.
"""

from __future__ import annotations

import hmac
import struct
import uuid as uuid_mod
from collections.abc import Iterator

import blake3

from orchestrator.repo.codec import CHUNK_SIZE, DIGEST_SIZE, ZERO_DIGEST
from orchestrator.repo.errors import CorruptIndex, IndexTampered

MAGIC = b"FPINDEX\0"
VERSION = 1  # unkeyed checksums
KEYED_VERSION = 2  # keyed BLAKE3, bound to where the index is stored
FIXED = struct.Struct(">8sHHI16sQIQ32sH")
CHECKSUM_SIZE = 32
MAX_BASE_LEN = 1024
MAX_ENTRIES = 2**32  # 8 PiB of 2 MiB chunks


def entry_count(virtual_size: int, chunk_size: int) -> int:
    return -(-virtual_size // chunk_size)


class IndexAuth:
    """The index key of a repository and the binding of one index (where it is stored)."""

    __slots__ = ("key", "binding")

    def __init__(self, key: bytes, binding: bytes):
        if len(key) != 32 or len(binding) > 0xFFFF:
            raise ValueError("bad index key or binding")
        self.key = key
        self.binding = binding

    def body(self, entries) -> bytes:
        return blake3.blake3(entries, key=self.key).digest()

    def header(self, header) -> bytes:
        h = blake3.blake3(struct.pack(">H", len(self.binding)), key=self.key)
        h.update(self.binding)
        h.update(header)
        return h.digest()


UNVERIFIED = "unverified"  # decode without the key: structure only


class Index:
    """A disk's chunk list. ``entries`` is a bytearray of ``32 * count`` (zeros = zero chunks)."""

    __slots__ = ("disk_uuid", "virtual_size", "chunk_size", "base", "entries", "mac")

    def __init__(
        self,
        disk_uuid: str,
        virtual_size: int,
        chunk_size: int = CHUNK_SIZE,
        base: str | None = None,
        entries: bytes | bytearray | memoryview | None = None,
    ):
        self.disk_uuid = str(uuid_mod.UUID(str(disk_uuid)))
        if virtual_size < 0 or chunk_size <= 0 or chunk_size % 512:
            raise ValueError(
                f"bad index geometry: virtual size {virtual_size}, chunk size {chunk_size}"
            )
        count = entry_count(virtual_size, chunk_size)
        if count > MAX_ENTRIES:
            raise ValueError(f"virtual size {virtual_size} too large")
        if base is not None and not (0 < len(base.encode()) <= MAX_BASE_LEN):
            raise ValueError(f"bad base index key {base!r}")
        self.virtual_size = virtual_size
        self.chunk_size = chunk_size
        self.base = base
        if entries is None:
            self.entries = bytearray(count * DIGEST_SIZE)
        else:
            if len(entries) != count * DIGEST_SIZE:
                raise ValueError(f"{len(entries)} entry bytes for {count} chunks")
            self.entries = bytearray(entries)
        self.mac: bytes | None = None  # header checksum of the object it was decoded from

    def __len__(self) -> int:
        return len(self.entries) // DIGEST_SIZE

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Index):
            return NotImplemented
        return (
            self.disk_uuid == other.disk_uuid
            and self.virtual_size == other.virtual_size
            and self.chunk_size == other.chunk_size
            and self.base == other.base
            and self.entries == other.entries
        )

    def __repr__(self) -> str:
        return (
            f"<Index disk={self.disk_uuid} size={self.virtual_size} chunks={len(self)} "
            f"base={self.base!r}>"
        )

    def get(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} out of range (index has {len(self)})")
        return bytes(self.entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])

    def set(self, i: int, digest: bytes) -> None:
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} out of range (index has {len(self)})")
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a digest is {DIGEST_SIZE} bytes, not {len(digest)}")
        self.entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest

    def digests(self) -> Iterator[bytes]:
        """Every entry in order (ZERO_DIGEST included)."""
        view = memoryview(self.entries)
        for offset in range(0, len(view), DIGEST_SIZE):
            yield bytes(view[offset : offset + DIGEST_SIZE])

    def referenced(self) -> set[bytes]:
        """The distinct stored chunks this index needs (ZERO_DIGEST excluded)."""
        found = set(self.digests())
        found.discard(ZERO_DIGEST)
        return found

    def derive(self, *, base: str | None, virtual_size: int | None = None) -> Index:
        """A copy for an incremental backup on top of this one (optionally resized: new chunks
        are zero, chunks past a smaller size are dropped)."""
        size = self.virtual_size if virtual_size is None else virtual_size
        count = entry_count(size, self.chunk_size)
        entries = bytearray(self.entries[: count * DIGEST_SIZE])
        entries.extend(bytes(count * DIGEST_SIZE - len(entries)))
        return Index(self.disk_uuid, size, self.chunk_size, base, entries)

    # -- serialization -----------------------------------------------------------------------

    def encode(self, auth: IndexAuth | None = None) -> bytes:
        """Version 1 bytes, or version 2 (keyed, bound) with ``auth``; sets ``self.mac``."""
        base = (self.base or "").encode("utf-8")
        fixed = FIXED.pack(
            MAGIC,
            VERSION if auth is None else KEYED_VERSION,
            0,
            FIXED.size + len(base) + CHECKSUM_SIZE,
            uuid_mod.UUID(self.disk_uuid).bytes,
            self.virtual_size,
            self.chunk_size,
            len(self),
            blake3.blake3(self.entries).digest() if auth is None else auth.body(self.entries),
            len(base),
        )
        header = fixed + base
        self.mac = blake3.blake3(header).digest() if auth is None else auth.header(header)
        return b"".join((header, self.mac, self.entries))

    @classmethod
    def decode(
        cls,
        data: bytes | bytearray | memoryview,
        name: str = "index",
        auth: IndexAuth | str | None = None,
    ) -> Index:
        """``auth``: None (version 1 expected), an IndexAuth (version 2 expected, checked with
        the key and binding) or UNVERIFIED (either version, keyed checksums not checked)."""
        view = memoryview(data)
        if len(view) < FIXED.size + CHECKSUM_SIZE:
            raise CorruptIndex(f"{name}: truncated ({len(view)} bytes)")
        (
            magic,
            version,
            flags,
            header_size,
            disk,
            virtual_size,
            chunk_size,
            count,
            body_sum,
            base_len,
        ) = FIXED.unpack_from(view)
        if magic != MAGIC:
            raise CorruptIndex(f"{name}: not an index (magic {bytes(magic)!r})")
        if version not in (VERSION, KEYED_VERSION):
            raise CorruptIndex(f"{name}: unknown index version {version}")
        keyed = isinstance(auth, IndexAuth)
        if keyed and version != KEYED_VERSION:
            raise IndexTampered(
                f"{name}: unauthenticated (version {version}) index in an encrypted repository"
            )
        if auth is None and version != VERSION:
            raise CorruptIndex(f"{name}: keyed (version {version}) index in this repository")
        check = auth is None or keyed or version == VERSION
        if base_len > MAX_BASE_LEN or header_size != FIXED.size + base_len + CHECKSUM_SIZE:
            raise CorruptIndex(f"{name}: bad header size {header_size} / base length {base_len}")
        if len(view) < header_size:
            raise CorruptIndex(f"{name}: truncated header ({len(view)} < {header_size} bytes)")
        header = view[: header_size - CHECKSUM_SIZE]
        mac = bytes(view[header_size - CHECKSUM_SIZE : header_size])
        if keyed:
            assert isinstance(auth, IndexAuth)
            if not hmac.compare_digest(auth.header(header), mac):
                raise IndexTampered(
                    f"{name}: authentication failed (edited, or moved from another VM, disk "
                    f"or restore point)"
                )
        elif check and blake3.blake3(header).digest() != mac:
            raise CorruptIndex(f"{name}: header checksum mismatch")
        if flags:
            raise CorruptIndex(f"{name}: unknown flags {flags:#x}")
        if chunk_size == 0 or chunk_size % 512:
            raise CorruptIndex(f"{name}: bad chunk size {chunk_size}")
        if count != entry_count(virtual_size, chunk_size) or count > MAX_ENTRIES:
            raise CorruptIndex(
                f"{name}: {count} entries for a {virtual_size}-byte disk of {chunk_size}-byte chunks"
            )
        if len(view) != header_size + count * DIGEST_SIZE:
            raise CorruptIndex(
                f"{name}: {len(view)} bytes, expected {header_size + count * DIGEST_SIZE} "
                f"({'truncated' if len(view) < header_size + count * DIGEST_SIZE else 'trailing data'})"
            )
        body = view[header_size:]
        if keyed:
            assert isinstance(auth, IndexAuth)
            if not hmac.compare_digest(auth.body(body), bytes(body_sum)):
                raise IndexTampered(f"{name}: authentication of the entries failed (edited)")
        elif check and blake3.blake3(body).digest() != body_sum:
            raise CorruptIndex(f"{name}: body checksum mismatch")
        try:
            base = (
                bytes(view[FIXED.size : FIXED.size + base_len]).decode("utf-8")
                if base_len
                else None
            )
        except UnicodeDecodeError:
            raise CorruptIndex(f"{name}: base key is not UTF-8") from None
        index = cls(str(uuid_mod.UUID(bytes=bytes(disk))), virtual_size, chunk_size, base, body)
        index.mac = mac
        return index


def decode_index(
    data: bytes | bytearray | memoryview, name: str = "index", auth: IndexAuth | str | None = None
) -> Index:
    return Index.decode(data, name, auth)
