# Type stubs for agent._speedups (compiled from ext/_speedups.pyx). The pure-Python twins in
# agent/_pyspeedups.py have the same signatures and document the contract.
from typing import Iterable, List, Optional, Tuple, Union

# Any C-contiguous buffer (bytes, bytearray, memoryview, array, mmap, ...), read as raw bytes.
Buffer = Union[bytes, bytearray, memoryview]

def bitmap_runs(bitmap: Buffer, first: int, count: int) -> List[Tuple[int, int, bool]]:
    """Runs of equal bits in bits [first, first + count): (start, length, is_set), MSB-first."""

def bitmap_count(bitmap: Buffer, first: int, count: int) -> int:
    """Number of set bits in bits [first, first + count)."""

def bitmap_claim(bitmap: Buffer, taken: Union[bytearray, memoryview]) -> bytes:
    """Return bitmap & ~taken and set taken |= bitmap in place (first len(taken) bytes)."""

def block_runs(
    bitmaps: Iterable[Optional[Buffer]], first: int, count: int
) -> List[Tuple[int, int, int]]:
    """(start, length, level): the first bitmap (leaf first) with the bits set, -1 for none."""

def is_zero(buf: Buffer) -> bool:
    """True if every byte of buf is zero."""

def zero_runs(buf: Buffer, granularity: int) -> List[Tuple[int, int, bool]]:
    """Runs of all-zero / not-all-zero granules: (offset, length, is_zero), merged."""
