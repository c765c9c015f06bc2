from __future__ import annotations

import os
import random
import uuid

import pytest

from orchestrator.repo.codec import CHUNK_SIZE, ZERO_DIGEST
from orchestrator.repo.errors import CorruptIndex
from orchestrator.repo.index import Index, decode_index

DISK = str(uuid.uuid4())


def sample_index(chunks=37, tail=12345, base="backups/vm/vdi/20261127T080000Z.index"):
    idx = Index(DISK, (chunks - 1) * CHUNK_SIZE + tail, CHUNK_SIZE, base)
    rng = random.Random(5)
    for i in range(chunks):
        if i % 3:
            idx.set(i, rng.randbytes(32))
    return idx


def test_roundtrip():
    idx = sample_index()
    data = idx.encode()
    back = decode_index(data)
    assert back == idx and back.base == idx.base and back.disk_uuid == DISK
    assert back.encode() == data
    assert len(back) == 37 and len(data) == len(idx.entries) + (len(data) - 37 * 32)


def test_entry_count_geometry():
    assert len(Index(DISK, 0)) == 0
    assert len(Index(DISK, 1)) == 1
    assert len(Index(DISK, CHUNK_SIZE)) == 1
    assert len(Index(DISK, CHUNK_SIZE + 1)) == 2
    one_tib = Index(DISK, 1 << 40)
    assert len(one_tib.entries) == 16 * 1024 * 1024  # 16 MiB per TiB
    assert decode_index(Index(DISK, 0).encode()) == Index(DISK, 0)


def test_no_base_and_accessors():
    idx = Index(DISK, 5 * CHUNK_SIZE)
    assert idx.base is None and decode_index(idx.encode()).base is None
    assert list(idx.digests()) == [ZERO_DIGEST] * 5
    assert idx.referenced() == set()
    a, b = os.urandom(32), os.urandom(32)
    idx.set(0, a)
    idx.set(3, b)
    idx.set(4, a)
    assert idx.get(0) == a and idx.get(1) == ZERO_DIGEST and idx.get(3) == b
    assert idx.referenced() == {a, b}
    with pytest.raises(IndexError):
        idx.get(5)
    with pytest.raises(IndexError):
        idx.set(-1, a)
    with pytest.raises(ValueError):
        idx.set(1, b"short")


def test_derive_for_incremental():
    idx = sample_index(chunks=4, tail=CHUNK_SIZE)
    inc = idx.derive(base="backups/x.index")
    assert inc.entries == idx.entries and inc.base == "backups/x.index"
    inc.set(0, os.urandom(32))
    assert inc.get(0) != idx.get(0)  # a copy, not a view
    grown = idx.derive(base=None, virtual_size=6 * CHUNK_SIZE)
    assert len(grown) == 6 and grown.get(5) == ZERO_DIGEST and grown.get(1) == idx.get(1)
    shrunk = idx.derive(base=None, virtual_size=CHUNK_SIZE + 1)
    assert len(shrunk) == 2 and shrunk.get(1) == idx.get(1)


def test_every_single_byte_corruption_detected():
    data = sample_index(chunks=9).encode()
    rng = random.Random(1)
    header_len = len(data) - 9 * 32
    positions = list(range(header_len)) + rng.sample(range(header_len, len(data)), 64)
    for pos in positions:
        for flip in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= flip
            with pytest.raises(CorruptIndex):
                decode_index(bytes(bad), "backups/vm/x.index")


def test_truncation_and_trailing_data_detected():
    data = sample_index(chunks=5).encode()
    for cut in range(len(data)):
        with pytest.raises(CorruptIndex):
            decode_index(data[:cut])
    with pytest.raises(CorruptIndex, match="trailing"):
        decode_index(data + b"\0" * 32)


def test_error_names_the_index():
    with pytest.raises(CorruptIndex, match="backups/vm1/a.index"):
        decode_index(b"garbage" * 20, "backups/vm1/a.index")


def test_bad_arguments():
    with pytest.raises(ValueError):
        Index("not-a-uuid", 10)
    with pytest.raises(ValueError):
        Index(DISK, 10, CHUNK_SIZE, None, b"\0" * 31)
    with pytest.raises(ValueError):
        Index(DISK, 10, 1000)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from orchestrator.repo.index import FIXED, MAGIC  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(
    fields=st.tuples(
        st.integers(0, 3),
        st.integers(0, 3),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**16 - 1),
    ),
    tail=st.binary(max_size=300),
)
def test_hostile_headers_only_raise_corrupt_index(fields, tail):
    version, flags, header_size, vsize, csize, count, base_len = fields
    data = (
        FIXED.pack(
            MAGIC, version, flags, header_size, bytes(16), vsize, csize, count, bytes(32), base_len
        )
        + tail
    )
    with pytest.raises(CorruptIndex):
        decode_index(data)
