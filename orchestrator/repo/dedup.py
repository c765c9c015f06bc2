"""Compact digest sets for deduplication.

:class:`DigestLookup` answers "may the repository already hold this chunk?" for cross-VM dedup.
It keeps one **8-byte prefix** per unique chunk in a sorted numpy ``uint64`` array: 8 bytes per
chunk = 4 MiB per TiB of unique data (524288 chunks of 2 MiB), under the 10 MB per TB budget.
A prefix hit is only a hint: the writer confirms it with ``exists()`` on the full digest's key
before relying on it, so a prefix collision costs one HEAD, never a wrong chunk.

It is built from the digests referenced by committed indexes and can be cached in the repository
(``cache/dedup-lookup``, written by GC, which reads every index anyway) together with the list of
index keys it covers; a writer loads the cache and reads only the indexes committed since.
A cached lookup may name chunks that GC has since deleted: harmless, because of the ``exists()``
confirmation and the writer's commit check (see :mod:`orchestrator.jobs.gc`).

:class:`KnownDigests` is the exact set of a base index's digests (sorted 32-byte records plus
their prefixes for the search): 40 bytes per chunk of the disk being backed up.
"""

from __future__ import annotations

import json
import struct

from orchestrator.lazy import numpy as np
from orchestrator.repo.codec import DIGEST_SIZE
from orchestrator.repo.errors import RepoError

CACHE_KEY = "cache/dedup-lookup"
CACHE_MAGIC = b"FPDEDUP1"
_PREFIX = ">u8"  # dtype, big-endian: numeric order = byte order of the digest
_RECORD = f"V{DIGEST_SIZE}"  # dtype: one digest


def records(entries: bytes | bytearray | memoryview) -> np.ndarray:
    """Index entries (32 bytes each) as an array of 32-byte records, zero entries dropped."""
    arr = np.frombuffer(entries, dtype=_RECORD)
    if not len(arr):
        return arr
    words = np.frombuffer(entries, dtype=np.uint64).reshape(-1, DIGEST_SIZE // 8)
    nonzero = words.any(axis=1)
    return arr[nonzero]


def prefixes(recs: np.ndarray) -> np.ndarray:
    """The 8-byte big-endian prefix of each 32-byte record."""
    if not len(recs):
        return np.empty(0, dtype=_PREFIX)
    raw = np.ascontiguousarray(recs).view(np.uint8).reshape(-1, DIGEST_SIZE)
    return np.ascontiguousarray(raw[:, :8]).view(_PREFIX).reshape(-1)


def _prefix_of(digest: bytes) -> np.uint64:
    return np.frombuffer(digest[:8], dtype=_PREFIX)[0]


class DigestLookup:
    """A sorted array of unique 8-byte digest prefixes."""

    __slots__ = ("_prefixes", "index_keys")

    def __init__(self, sorted_prefixes: np.ndarray | None = None, index_keys=()):
        self._prefixes = np.empty(0, dtype=_PREFIX) if sorted_prefixes is None else sorted_prefixes
        self.index_keys: set[str] = set(index_keys)

    def __len__(self) -> int:
        return len(self._prefixes)

    @property
    def nbytes(self) -> int:
        """Bytes of the lookup table (the RAM that grows with the repository)."""
        return int(self._prefixes.nbytes)

    def add_entries(self, key: str | None, entries: bytes | bytearray | memoryview) -> None:
        """Add the digests of one index (``key`` recorded as covered)."""
        new = np.unique(prefixes(records(entries)))
        if len(new):
            self._prefixes = np.union1d(self._prefixes, new).astype(_PREFIX, copy=False)
        if key is not None:
            self.index_keys.add(key)

    def add_many(self, parts: list[tuple[str, bytes | bytearray | memoryview]]) -> None:
        """Add many indexes at once (one sort instead of one merge per index)."""
        arrays = [self._prefixes] + [prefixes(records(e)) for _, e in parts]
        self._prefixes = np.unique(np.concatenate(arrays)).astype(_PREFIX, copy=False)
        self.index_keys.update(k for k, _ in parts)

    def add_digest(self, digest: bytes) -> None:
        p = _prefix_of(digest)
        pos = int(np.searchsorted(self._prefixes, p))
        if pos < len(self._prefixes) and self._prefixes[pos] == p:
            return
        self._prefixes = np.insert(self._prefixes, pos, p)

    def may_contain(self, digest: bytes) -> bool:
        """True if a chunk with this digest's prefix is known (confirm before relying on it)."""
        p = _prefix_of(digest)
        pos = int(np.searchsorted(self._prefixes, p))
        return pos < len(self._prefixes) and bool(self._prefixes[pos] == p)

    # -- cache object --------------------------------------------------------------------------

    def encode(self) -> bytes:
        header = json.dumps({"index_keys": sorted(self.index_keys)}).encode()
        return b"".join(
            (
                CACHE_MAGIC,
                struct.pack(">QQ", len(header), len(self._prefixes)),
                header,
                self._prefixes.astype(_PREFIX).tobytes(),
            )
        )

    @classmethod
    def decode(cls, data: bytes, name: str = CACHE_KEY) -> DigestLookup:
        try:
            if data[:8] != CACHE_MAGIC:
                raise ValueError("bad magic")
            hlen, count = struct.unpack_from(">QQ", data, 8)
            start = 24 + hlen
            if len(data) != start + 8 * count:
                raise ValueError("bad length")
            keys = json.loads(data[24:start])["index_keys"]
            arr = np.frombuffer(data, dtype=_PREFIX, count=count, offset=start).copy()
            if count > 1 and not bool(np.all(arr[1:] > arr[:-1])):
                raise ValueError("prefixes not sorted")
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise RepoError(f"{name}: unreadable dedup cache ({exc})") from None
        return cls(arr, keys)


class KnownDigests:
    """Exact membership in a set of digests (e.g. a base index's)."""

    __slots__ = ("_records", "_prefixes")

    def __init__(self, entries: bytes | bytearray | memoryview = b""):
        self._records = np.unique(records(entries))  # sorted by bytes
        self._prefixes = prefixes(self._records)  # therefore sorted too

    def __len__(self) -> int:
        return len(self._records)

    @property
    def nbytes(self) -> int:
        return int(self._records.nbytes + self._prefixes.nbytes)

    def __contains__(self, digest: bytes) -> bool:
        p = _prefix_of(digest)
        lo = int(np.searchsorted(self._prefixes, p, side="left"))
        hi = int(np.searchsorted(self._prefixes, p, side="right"))
        return any(self._records[k].tobytes() == digest for k in range(lo, hi))

    def intersection(self, recs: np.ndarray) -> list[bytes]:
        """The digests of ``recs`` (32-byte records) that are in this set."""
        if not len(recs) or not len(self._records):
            return []
        common = np.intersect1d(self._records, recs)
        return [r.tobytes() for r in common]


__all__ = ["CACHE_KEY", "DigestLookup", "KnownDigests", "prefixes", "records"]
