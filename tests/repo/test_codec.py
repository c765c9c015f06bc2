from __future__ import annotations

import os
import types

import pytest

from orchestrator.repo import codec as codec_mod
from orchestrator.repo.codec import (
    CHUNK_SIZE,
    HEADER_SIZE,
    ZERO_DIGEST,
    ChunkCodec,
    chunk_key,
    digest_from_key,
)
from orchestrator.repo.errors import CorruptChunk, RepoError


def cfg(*, encrypted=False, compression="zstd:1"):
    return types.SimpleNamespace(
        chunk_size=CHUNK_SIZE, encrypted=encrypted, compression=compression
    )


TEXT = (b"The quick brown fox jumps over the lazy dog. " * 50000)[: CHUNK_SIZE // 2]
RANDOM = os.urandom(CHUNK_SIZE)
MIXED = TEXT[: CHUNK_SIZE // 4] + os.urandom(CHUNK_SIZE // 4) + bytes(CHUNK_SIZE // 2)

CODECS = {
    "plain": lambda: ChunkCodec(cfg(compression="none")),
    "zstd": lambda: ChunkCodec(cfg()),
    "encrypted": lambda: ChunkCodec(cfg(encrypted=True, compression="none"), os.urandom(32)),
    "zstd+encrypted": lambda: ChunkCodec(cfg(encrypted=True), os.urandom(32)),
}


@pytest.fixture(params=sorted(CODECS))
def codec(request):
    return CODECS[request.param]()


@pytest.mark.parametrize(
    "data", [TEXT, RANDOM, MIXED, b"x", b""], ids=["text", "random", "mixed", "1B", "0B"]
)
def test_roundtrip(codec, data):
    digest = codec.digest(data)
    obj = codec.encode(data, digest)
    assert codec.decode(obj, digest) == data
    assert codec.decode(memoryview(obj), digest) == data
    flags = obj[5]
    assert bool(flags & codec_mod.FLAG_ENCRYPTED) == codec.encrypted


def test_unkeyed_digest_is_plain_blake3():
    import blake3

    assert ChunkCodec(cfg()).digest(TEXT) == blake3.blake3(TEXT).digest()


def test_zstd_kept_only_when_smaller():
    c = ChunkCodec(cfg())
    text_obj = c.encode(TEXT, c.digest(TEXT))
    assert text_obj[5] & codec_mod.FLAG_COMPRESSED and len(text_obj) < len(TEXT) // 10
    rand_obj = c.encode(RANDOM, c.digest(RANDOM))
    assert not rand_obj[5] & codec_mod.FLAG_COMPRESSED
    assert len(rand_obj) == HEADER_SIZE + len(RANDOM)
    assert rand_obj[HEADER_SIZE:] == RANDOM


def test_encryption_hides_plaintext_and_uses_fresh_nonces():
    c = CODECS["encrypted"]()
    d = c.digest(TEXT)
    a, b = c.encode(TEXT, d), c.encode(TEXT, d)
    assert a != b  # random nonce
    assert TEXT[:64] not in a
    assert c.decode(a, d) == c.decode(b, d) == TEXT


def test_same_key_same_digest_different_keys_differ():
    key = os.urandom(32)
    one, two = ChunkCodec(cfg(encrypted=True), key), ChunkCodec(cfg(encrypted=True), key)
    assert one.digest(MIXED) == two.digest(MIXED)  # dedup under encryption
    other = ChunkCodec(cfg(encrypted=True), os.urandom(32))
    plain = ChunkCodec(cfg())
    assert len({one.digest(MIXED), other.digest(MIXED), plain.digest(MIXED)}) == 3


def test_foreign_key_cannot_decode():
    one = ChunkCodec(cfg(encrypted=True), os.urandom(32))
    other = ChunkCodec(cfg(encrypted=True), os.urandom(32))
    d = one.digest(TEXT)
    with pytest.raises(CorruptChunk, match="authentication"):
        other.decode(one.encode(TEXT, d), d)


@pytest.mark.parametrize("data", [TEXT, RANDOM], ids=["compressed", "stored"])
def test_every_flipped_byte_sample_is_detected(codec, data):
    digest = codec.digest(data)
    obj = codec.encode(data, digest)
    positions = sorted({*range(HEADER_SIZE + 2), len(obj) - 1, *range(HEADER_SIZE, len(obj), 9973)})
    for pos in positions:
        bad = bytearray(obj)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptChunk, match=digest.hex()):
            codec.decode(bytes(bad), digest)


def test_truncation_and_extension_detected(codec):
    digest = codec.digest(MIXED)
    obj = codec.encode(MIXED, digest)
    for cut in (0, 5, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, len(obj) // 2, len(obj) - 1):
        with pytest.raises(CorruptChunk):
            codec.decode(obj[:cut], digest)
    with pytest.raises(CorruptChunk):
        codec.decode(obj + b"\0", digest)


def test_object_under_another_digest_is_refused(codec):
    da, db = codec.digest(TEXT), codec.digest(MIXED)
    with pytest.raises(CorruptChunk):
        codec.decode(codec.encode(TEXT, da), db)


def test_encrypted_and_plain_objects_not_interchangeable():
    key = os.urandom(32)
    enc, plain = ChunkCodec(cfg(encrypted=True), key), ChunkCodec(cfg())
    d = enc.digest(TEXT)
    forged = plain.encode(TEXT, d)  # an attacker writes a plaintext object under a keyed digest
    with pytest.raises(CorruptChunk, match="unencrypted object"):
        enc.decode(forged, d)
    with pytest.raises(CorruptChunk, match="encrypted object"):
        plain.decode(enc.encode(TEXT, d), d)


def test_zero_chunk_is_reserved(codec):
    zeros = bytes(CHUNK_SIZE)
    assert codec.digest_or_zero(zeros) == ZERO_DIGEST
    assert codec.digest_or_zero(TEXT) == codec.digest(TEXT) != ZERO_DIGEST
    with pytest.raises(ValueError):
        codec.encode(zeros, ZERO_DIGEST)


def test_oversized_chunk_refused(codec):
    data = bytes(CHUNK_SIZE) + b"x"
    with pytest.raises(ValueError):
        codec.encode(data, codec.digest(data))


def test_lying_zstd_frame_size_is_refused():
    import zstandard

    c = ChunkCodec(cfg())
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * 1024 * 1024))
    header = codec_mod.HEADER.pack(codec_mod.MAGIC, 1, codec_mod.FLAG_COMPRESSED, 0, 100, len(bomb))
    with pytest.raises(CorruptChunk, match="zstd frame"):
        c.decode(header + bomb, bytes(range(32)))


def test_chunk_key_layout():
    d = bytes(range(32))
    assert chunk_key(d) == "chunks/00/" + d.hex()
    assert digest_from_key(chunk_key(d)) == d
    for bad in ("chunks/01/" + d.hex(), "chunks/00/abc", "x/00/" + d.hex()):
        with pytest.raises(ValueError):
            digest_from_key(bad)


def test_key_required_exactly_when_encrypted():
    with pytest.raises(RepoError):
        ChunkCodec(cfg(encrypted=True))
    with pytest.raises(RepoError):
        ChunkCodec(cfg(), os.urandom(32))


def test_thread_safety_under_concurrency():
    import concurrent.futures

    c = CODECS["zstd+encrypted"]()
    datas = [os.urandom(1000) + bytes([i]) * 300000 for i in range(24)]

    def roundtrip(data):
        d = c.digest(data)
        return c.decode(c.encode(data, d), d) == data

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert all(pool.map(roundtrip, datas))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_CODECS = [CODECS[name]() for name in sorted(CODECS)]


@settings(max_examples=300, deadline=None)
@given(
    flags=st.integers(0, 255),
    size=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=200),
    declared=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_hostile_objects_only_raise_corrupt_chunk(flags, size, payload, declared):
    """A crafted header over any payload: CorruptChunk, never another exception or a result."""
    length = len(payload) if declared is None else declared
    obj = codec_mod.HEADER.pack(codec_mod.MAGIC, 1, flags, 0, size, length) + payload
    digest = bytes(range(1, 33))
    for c in FUZZ_CODECS:
        with pytest.raises(CorruptChunk):
            c.decode(obj, digest)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_garbage_only_raises_corrupt_chunk(data):
    for c in FUZZ_CODECS:
        with pytest.raises(CorruptChunk):
            c.decode(data, bytes(range(32)))
