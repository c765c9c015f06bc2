"""Chunk codec: digest, compression and authenticated encryption of 2 MiB chunks.

Chunk object layout (all integers big-endian)::

    offset size
         0    4  magic b"FPCH"
         4    1  version (1)
         5    1  flags: bit 0 = zstd-compressed, bit 1 = AES-256-GCM encrypted; other bits 0
         6    2  reserved, 0
         8    4  plaintext length (the chunk's bytes, <= the repository's chunk size)
        12    4  payload length (bytes after this header)
        16       payload: the (compressed) chunk; when encrypted, a 96-bit random nonce then
                 the ciphertext and its 16-byte tag

When encrypted, the associated data is the 16-byte header followed by the chunk's digest, so a
header, a payload or an object moved to another digest's name all fail authentication.

Digest = BLAKE3 of the plaintext; in an encrypted repository, keyed BLAKE3 with a digest key
derived from the data key, so equal chunks still deduplicate but digests say nothing about the
content to someone without the key. The all-zero chunk has the reserved digest ZERO_DIGEST and
is never stored (see :func:`ChunkCodec.digest_or_zero`).

Thread safety: a ChunkCodec is shared by the writer's threads. BLAKE3, zstd and AES-GCM run
outside the GIL for large buffers; zstd (de)compressors are kept per thread.
"""

from __future__ import annotations

import hmac
import os
import struct
import threading
from typing import Protocol

import blake3

from orchestrator.lazy import aead, crypto_exceptions, speedups, zstandard
from orchestrator.repo.errors import CorruptChunk, RepoError

CHUNK_SIZE = 2 * 1024 * 1024
DIGEST_SIZE = 32
ZERO_DIGEST = bytes(DIGEST_SIZE)

MAGIC = b"FPCH"
VERSION = 1
FLAG_COMPRESSED = 0x01
FLAG_ENCRYPTED = 0x02
HEADER = struct.Struct(">4sBBHII")
HEADER_SIZE = HEADER.size  # 16
NONCE_SIZE = 12
TAG_SIZE = 16

DIGEST_KEY_CONTEXT = "xcp-fastpath 2026-11 chunk digest key v1"
CIPHER_KEY_CONTEXT = "xcp-fastpath 2026-11 chunk cipher key v1"


def chunk_key(digest: bytes) -> str:
    """The object key of a chunk: ``chunks/<first byte hex>/<digest hex>``."""
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"a chunk digest is {DIGEST_SIZE} bytes, not {len(digest)}")
    text = digest.hex()
    return f"chunks/{text[:2]}/{text}"


def digest_from_key(key: str) -> bytes:
    """Inverse of :func:`chunk_key` (ValueError if ``key`` is not a chunk key)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "chunks" or len(parts[2]) != 2 * DIGEST_SIZE:
        raise ValueError(f"not a chunk key: {key!r}")
    digest = bytes.fromhex(parts[2])
    if parts[1] != parts[2][:2]:
        raise ValueError(f"not a chunk key: {key!r}")
    return digest


def is_zero_chunk(data: bytes | memoryview) -> bool:
    return speedups.is_zero(data)


class CodecSettings(Protocol):
    """What a codec needs of a repository's settings: a
    :class:`orchestrator.repo.config.RepoConfig` (the config module builds on this one)."""

    @property
    def chunk_size(self) -> int: ...

    @property
    def compression(self) -> str: ...

    @property
    def encrypted(self) -> bool: ...


class ChunkCodec:
    """Encode/decode chunk objects for one repository.

    ``config`` supplies ``chunk_size``, ``compression`` ("zstd:<level>" or "none") and
    ``encrypted``; ``data_key`` (32 bytes) is required exactly when the repository is encrypted.
    """

    def __init__(
        self, config: CodecSettings, data_key: bytes | None = None, *, digest_threads: int = 1
    ):
        self.chunk_size = int(config.chunk_size)
        self.encrypted = bool(config.encrypted)
        if self.encrypted != (data_key is not None):
            raise RepoError(
                "an encrypted repository needs its data key"
                if self.encrypted
                else "a data key was given for an unencrypted repository"
            )
        self.compression = config.compression
        self._level = parse_compression(config.compression)
        self._digest_threads = digest_threads
        self._digest_key: bytes | None = None
        self._aead: aead.AESGCM | None = None
        if data_key is not None:
            if len(data_key) != 32:
                raise RepoError(f"a data key is 32 bytes, not {len(data_key)}")
            self._digest_key = blake3.blake3(
                data_key, derive_key_context=DIGEST_KEY_CONTEXT
            ).digest()
            cipher_key = blake3.blake3(data_key, derive_key_context=CIPHER_KEY_CONTEXT).digest()
            self._aead = aead.AESGCM(cipher_key)
        self._local = threading.local()

    def same_keys(self, other: object) -> bool:
        """True if ``other`` computes the same digests and opens the same ciphertext (both
        unencrypted, or both encrypted under the same data key): its chunk objects can then
        be copied into this codec's repository as they are."""
        if not isinstance(other, ChunkCodec) or self.encrypted != other.encrypted:
            return False
        if not self.encrypted:
            return True
        return hmac.compare_digest(self._digest_key or b"", other._digest_key or b"")

    # -- per-thread zstd contexts --------------------------------------------------------------

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self._level or 1)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    # -- digest ------------------------------------------------------------------------------

    def digest(self, data: bytes | memoryview) -> bytes:
        """BLAKE3 (keyed when encrypted) of ``data``. Does not special-case zeros."""
        if self._digest_key is not None:
            h = blake3.blake3(data, key=self._digest_key, max_threads=self._digest_threads)
        else:
            h = blake3.blake3(data, max_threads=self._digest_threads)
        return h.digest()

    def digest_or_zero(self, data: bytes | memoryview) -> bytes:
        """ZERO_DIGEST for an all-zero chunk (never stored), else :meth:`digest`."""
        if speedups.is_zero(data):
            return ZERO_DIGEST
        return self.digest(data)

    # -- encode / decode ---------------------------------------------------------------------

    def encode(self, data: bytes | memoryview, digest: bytes) -> bytes:
        """The object to store for a chunk whose digest (from :meth:`digest`) is ``digest``."""
        if len(digest) != DIGEST_SIZE or digest == ZERO_DIGEST:
            raise ValueError(
                "encode() needs the chunk's real digest (the zero chunk is never stored)"
            )
        size = len(data)
        if size > self.chunk_size:
            raise ValueError(f"chunk of {size} bytes exceeds the chunk size {self.chunk_size}")
        flags = 0
        payload: bytes | memoryview = data
        if self._level is not None:
            packed = self._compressor().compress(data)
            if len(packed) < size:
                payload = packed
                flags |= FLAG_COMPRESSED
        if self._aead is None:
            header = HEADER.pack(MAGIC, VERSION, flags, 0, size, len(payload))
            return b"".join((header, payload))
        flags |= FLAG_ENCRYPTED
        header = HEADER.pack(MAGIC, VERSION, flags, 0, size, NONCE_SIZE + len(payload) + TAG_SIZE)
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, payload, header + digest)
        return b"".join((header, nonce, sealed))

    def decode(self, obj: bytes | memoryview, digest: bytes) -> bytes:
        """The chunk's plaintext, after checking everything. CorruptChunk on any mismatch."""
        name = chunk_key(digest)
        if len(obj) < HEADER_SIZE:
            raise CorruptChunk(
                f"chunk {name}: truncated ({len(obj)} bytes, header is {HEADER_SIZE})"
            )
        view = memoryview(obj)
        header = bytes(view[:HEADER_SIZE])
        magic, version, flags, reserved, size, payload_len = HEADER.unpack(header)
        if magic != MAGIC:
            raise CorruptChunk(f"chunk {name}: bad magic {magic!r}")
        if version != VERSION:
            raise CorruptChunk(f"chunk {name}: unknown chunk format version {version}")
        if flags & ~(FLAG_COMPRESSED | FLAG_ENCRYPTED) or reserved:
            raise CorruptChunk(f"chunk {name}: unknown flags {flags:#x}/{reserved:#x}")
        if size > self.chunk_size:
            raise CorruptChunk(f"chunk {name}: plaintext length {size} > chunk size")
        if len(view) != HEADER_SIZE + payload_len:
            raise CorruptChunk(
                f"chunk {name}: object is {len(view)} bytes, header says {HEADER_SIZE + payload_len}"
            )
        payload = view[HEADER_SIZE:]
        encrypted = bool(flags & FLAG_ENCRYPTED)
        if encrypted != self.encrypted:
            raise CorruptChunk(
                f"chunk {name}: {'encrypted' if encrypted else 'unencrypted'} object in an "
                f"{'encrypted' if self.encrypted else 'unencrypted'} repository"
            )
        if self._aead is not None:
            if payload_len < NONCE_SIZE + TAG_SIZE:
                raise CorruptChunk(f"chunk {name}: encrypted payload too short ({payload_len})")
            try:
                payload = memoryview(
                    self._aead.decrypt(payload[:NONCE_SIZE], payload[NONCE_SIZE:], header + digest)
                )
            except crypto_exceptions.InvalidTag:
                raise CorruptChunk(
                    f"chunk {name}: authentication failed (damaged or foreign)"
                ) from None
        if flags & FLAG_COMPRESSED:
            try:
                # The frame declares its size; check it before letting zstd allocate for it.
                declared = zstandard.frame_content_size(payload)
                if declared != size:
                    raise CorruptChunk(
                        f"chunk {name}: zstd frame of {declared} bytes, header says {size}"
                    )
                plain = self._decompressor().decompress(payload)
            except zstandard.ZstdError as exc:
                raise CorruptChunk(f"chunk {name}: zstd: {exc}") from None
        else:
            plain = bytes(payload)
        if len(plain) != size:
            raise CorruptChunk(f"chunk {name}: {len(plain)} bytes, header says {size}")
        if not hmac.compare_digest(self.digest(plain), digest):
            raise CorruptChunk(f"chunk {name}: digest mismatch")
        return plain


def parse_compression(spec: str) -> int | None:
    """The zstd level of a compression spec ("zstd:<level>", "zstd"), None for "none";
    ValueError for anything else (the config refuses it, ``repo init`` reports it)."""
    if spec == "none":
        return None
    name, _, level = spec.partition(":")
    if name != "zstd":
        raise ValueError(f"unknown compression {spec!r}")
    value = int(level or "1")
    # 1..22 are zstd's normal levels; -1..-100 its "fast" levels (less CPU, bigger output),
    # for hosts where compression is what limits a backup. 0 would mean zstd's default (3).
    if not (1 <= value <= 22 or -100 <= value <= -1):
        raise ValueError(f"zstd level out of range in {spec!r} (1..22, or -1..-100 for fast)")
    return value
