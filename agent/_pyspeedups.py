"""Pure-Python twins of the compiled hot loops in ext/_speedups.pyx.

Every function here has the same name, signature and results as its compiled twin; the test suite runs
both (tests/test_speedups.py) and CI runs the whole suite once with these forced (FASTPATH_PURE=1).
Bitmaps are VHD sector bitmaps: bit i is (bitmap[i >> 3] >> (7 - (i & 7))) & 1 (MSB first).
"""

_ZEROS = bytes(1 << 21)


def bitmap_runs(bitmap, first, count):
    """Runs of equal bits in bits [first, first + count) as a list of (start, length, is_set)."""
    if count <= 0:
        return []
    nbytes = len(bitmap)
    if first < 0 or first + count > nbytes * 8:
        raise ValueError("bit range [%d, %d) outside a %d-byte bitmap" % (first, first + count, nbytes))
    value = int.from_bytes(bitmap, "big")
    total = nbytes * 8
    # Bit i (MSB first) is bit (total - 1 - i) of the integer.
    value >>= total - (first + count)
    value &= (1 << count) - 1
    runs = []
    pos = 0  # bits consumed from the most significant end (bit index first + pos)
    while pos < count:
        remaining = count - pos
        top = (value >> (remaining - 1)) & 1
        window = value & ((1 << remaining) - 1)
        if top:
            # length of the run of ones at the top of a `remaining`-bit window
            inverted = ~window & ((1 << remaining) - 1)
            length = remaining - inverted.bit_length()
        else:
            length = remaining - window.bit_length()
        runs.append((first + pos, length, bool(top)))
        pos += length
    return runs


def bitmap_count(bitmap, first, count):
    """Number of set bits in bits [first, first + count)."""
    if count <= 0:
        return 0
    total = len(bitmap) * 8
    if first < 0 or first + count > total:
        raise ValueError("bit range outside bitmap")
    value = int.from_bytes(bitmap, "big") >> (total - (first + count))
    return bin(value & ((1 << count) - 1)).count("1")


def bitmap_claim(bitmap, taken):
    """Return bitmap & ~taken (bytes) and set taken |= bitmap in place (taken is a bytearray).

    Used to assemble a block from a chain: walking from the leaf to the root, each level supplies the
    sectors its bitmap has that no level above it supplied.
    """
    n = len(taken)
    if len(bitmap) < n:
        raise ValueError("bitmap shorter than the taken mask")
    b = int.from_bytes(bitmap[:n], "big")
    t = int.from_bytes(taken, "big")
    taken[:] = (t | b).to_bytes(n, "big")
    return (b & ~t).to_bytes(n, "big")


def is_zero(buf):
    """True if every byte of buf (bytes, bytearray or memoryview) is zero."""
    mv = memoryview(buf).cast("B")
    n = len(mv)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        if mv[pos : pos + step] != _ZEROS[:step]:
            return False
        pos += step
    return True


def zero_runs(buf, granularity):
    """Runs of all-zero / not-all-zero granules of buf: list of (offset, length, is_zero).

    The last granule may be shorter than `granularity`.
    """
    if granularity <= 0:
        raise ValueError("granularity must be positive")
    mv = memoryview(buf).cast("B")
    n = len(mv)
    runs = []
    pos = 0
    while pos < n:
        step = min(granularity, n - pos)
        z = mv[pos : pos + step] == _ZEROS[:step] if step <= len(_ZEROS) else is_zero(mv[pos : pos + step])
        if runs and runs[-1][2] == z:
            off, length, _ = runs[-1]
            runs[-1] = (off, length + step, z)
        else:
            runs.append((pos, step, z))
        pos += step
    return runs


def self_test(module):
    """Known answers every implementation must give; the loader runs it on the compiled module."""
    bm = bytes([0b10110000, 0xFF, 0x00, 0x01])
    expected = [(0, 1, True), (1, 1, False), (2, 2, True), (4, 4, False), (8, 8, True), (16, 15, False), (31, 1, True)]
    if module.bitmap_runs(bm, 0, 32) != expected:
        raise AssertionError("bitmap_runs known answer failed")
    if module.bitmap_runs(bm, 3, 7) != [(3, 1, True), (4, 4, False), (8, 2, True)]:
        raise AssertionError("bitmap_runs offset known answer failed")
    if module.bitmap_count(bm, 0, 32) != 12:
        raise AssertionError("bitmap_count known answer failed")
    taken = bytearray([0b10000000, 0x0F, 0, 0])
    if module.bitmap_claim(bm, taken) != bytes([0b00110000, 0xF0, 0, 1]) or taken != bytearray(
        [0b10110000, 0xFF, 0, 1]
    ):
        raise AssertionError("bitmap_claim known answer failed")
    if not module.is_zero(bytes(4096)) or module.is_zero(bytes(4095) + b"\x01"):
        raise AssertionError("is_zero known answer failed")
    buf = bytes(8192) + b"x" * 4096 + bytes(100)
    if module.zero_runs(buf, 4096) != [(0, 8192, True), (8192, 4096, False), (12288, 100, True)]:
        raise AssertionError("zero_runs known answer failed")
