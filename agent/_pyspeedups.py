"""Pure-Python twins of the compiled hot loops in ext/_speedups.pyx.

Every function here has the same name, signature, results and exceptions as its compiled twin; the test
suite runs both (tests/test_speedups.py) and CI runs the whole suite once with these forced
(FASTPATH_PURE=1). In dom0 there is no compiler, so these twins may be what runs in production: they
avoid per-bit and per-byte Python loops (the work is done by int/str/bytes methods implemented in C).

Bit positions, counts and granularities are integers (TypeError otherwise, even where unused).
Buffers ("bytes-like") are bytes, bytearray, memoryview or any other C-contiguous buffer; they are read
as their raw bytes whatever their item format. A non-contiguous buffer raises ValueError.

Bitmaps are VHD sector bitmaps: bit i is (bitmap[i >> 3] >> (7 - (i & 7))) & 1 (MSB first).
"""

from operator import index as _index

_BIT_COUNT = getattr(int, "bit_count", None)  # Python 3.10+; bin().count() before that

_ZLEN = 1 << 21
_ZEROS = bytes(_ZLEN)
_ZMV = memoryview(_ZEROS)


def _view(buf):
    """A 1-D unsigned-byte memoryview of buf's raw bytes; ValueError if buf is not C-contiguous."""
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _check_range(nbytes, first, count):
    if first < 0 or first + count > nbytes * 8:
        raise ValueError(
            "bit range [%d, %d) outside a %d-byte bitmap" % (first, first + count, nbytes)
        )


def _bits_value(bm, first, count):
    """Bits [first, first + count) of bitmap view bm as an int (bit `first` is the most significant)."""
    b0 = first >> 3
    b1 = (first + count + 7) >> 3
    value = int.from_bytes(bm[b0:b1], "big")
    return (value >> ((b1 << 3) - first - count)) & ((1 << count) - 1)


def bitmap_runs(bitmap, first, count):
    """Runs of equal bits in bits [first, first + count) as a list of (start, length, is_set).

    An empty or negative count gives []; a range outside the bitmap raises ValueError.
    """
    first = _index(first)
    count = _index(count)
    if count <= 0:
        return []
    bm = _view(bitmap)
    _check_range(len(bm), first, count)
    value = _bits_value(bm, first, count)
    if value == 0:
        return [(first, count, False)]
    if value == (1 << count) - 1:
        return [(first, count, True)]
    bits = format(value, "0%db" % count)
    find = bits.find
    runs = []
    append = runs.append
    pos = 0
    while pos < count:
        if bits[pos] == "1":
            nxt = find("0", pos)
            is_set = True
        else:
            nxt = find("1", pos)
            is_set = False
        if nxt < 0:
            nxt = count
        append((first + pos, nxt - pos, is_set))
        pos = nxt
    return runs


def bitmap_count(bitmap, first, count):
    """Number of set bits in bits [first, first + count) (0 for an empty or negative count)."""
    first = _index(first)
    count = _index(count)
    if count <= 0:
        return 0
    bm = _view(bitmap)
    _check_range(len(bm), first, count)
    value = _bits_value(bm, first, count)
    if _BIT_COUNT is not None:
        return _BIT_COUNT(value)
    return bin(value).count("1")


def bitmap_claim(bitmap, taken):
    """Return bitmap & ~taken (bytes) and set taken |= bitmap in place.

    taken is a writable buffer (a bytearray; TypeError otherwise) of n bytes; only the first n bytes of
    bitmap are used (ValueError if it is shorter). Used to assemble a block from a chain: walking from
    the leaf to the root, each level supplies the sectors its bitmap has that no level above supplied.
    """
    tv = _view(taken)
    if tv.readonly:
        raise TypeError("taken must be a writable buffer (a bytearray)")
    bv = _view(bitmap)
    n = len(tv)
    if len(bv) < n:
        raise ValueError("bitmap (%d bytes) shorter than the taken mask (%d bytes)" % (len(bv), n))
    b = int.from_bytes(bv[:n], "big")
    t = int.from_bytes(tv, "big")
    tv[:] = (t | b).to_bytes(n, "big")
    return (b & ~t).to_bytes(n, "big")


def _bits_of(s, ch, other, first, label, out):
    """Append (first + pos, length, label) for each run of character ch in the bit string s."""
    n = len(s)
    pos = s.find(ch)
    while pos >= 0:
        end = s.find(other, pos)
        if end < 0:
            end = n
        out.append((first + pos, end - pos, label))
        pos = s.find(ch, end)


def block_runs(bitmaps, first, count):
    """Which level supplies each sector of bits [first, first + count) of one block of a chain.

    bitmaps: the block's sector bitmaps, leaf first (any iterable); None for a level that does not
    have the block (give a level whose block is full an all-ones bitmap). Returns sorted, maximal runs
    (start, length, level): level is the index in bitmaps of the first bitmap with those bits set, or
    -1 where no level has them (read from below the chain, or zeros). Every non-None bitmap must cover
    the range (ValueError); an empty or negative count gives [].
    """
    first = _index(first)
    count = _index(count)
    levels = list(bitmaps)
    if count <= 0:
        return []
    values = []
    for bm in levels:
        if bm is None:
            values.append(None)
            continue
        v = _view(bm)
        _check_range(len(v), first, count)
        values.append(_bits_value(v, first, count))
    full = (1 << count) - 1
    width = "0%db" % count
    taken = 0
    runs = []
    for li, bits in enumerate(values):
        if bits is None:
            continue
        claim = bits & ~taken
        if claim:
            _bits_of(format(claim, width), "1", "0", first, li, runs)
            taken |= claim
            if taken == full:
                break
    if taken != full:
        _bits_of(format(taken, width), "0", "1", first, -1, runs)
    runs.sort()
    return runs


def _zero_from(data, pos, length):
    """True if data[pos:pos + length] is all zero; data is bytes or bytearray (compared in place)."""
    end = pos + length
    while pos < end:
        step = min(end - pos, _ZLEN)
        if not data.startswith(_ZMV[:step], pos):
            return False
        pos += step
    return True


def is_zero(buf):
    """True if every byte of buf is zero (True for an empty buffer)."""
    mv = _view(buf)
    n = len(mv)
    if isinstance(buf, (bytes, bytearray)):
        return _zero_from(buf, 0, n)
    if n and (mv[0] or mv[n - 1]):
        return False
    pos = 0
    while pos < n:
        step = min(n - pos, _ZLEN)
        if not _zero_from(mv[pos : pos + step].tobytes(), 0, step):
            return False
        pos += step
    return True


def zero_runs(buf, granularity):
    """Runs of all-zero / not-all-zero granules of buf: list of (offset, length, is_zero).

    Granules are granularity bytes long (ValueError unless positive); the last one may be shorter.
    Adjacent granules of the same kind are merged, so runs alternate. An empty buffer gives [].
    """
    granularity = _index(granularity)
    if granularity <= 0:
        raise ValueError("granularity must be positive")
    mv = _view(buf)
    n = len(mv)
    if n == 0:
        return []
    if is_zero(mv):
        return [(0, n, True)]
    g = min(granularity, n)
    direct = isinstance(buf, (bytes, bytearray))
    # Memoryviews are copied a window (about 2 MiB, whole granules) at a time so that bytes.startswith
    # can compare in place; bytes and bytearray are compared without copying.
    window = g * max(1, _ZLEN // g)
    runs = []
    cur_off = 0
    cur_z = None
    wpos = 0
    while wpos < n:
        wlen = min(window, n - wpos)
        if direct:
            data, base = buf, wpos
        else:
            data, base = mv[wpos : wpos + wlen].tobytes(), 0
        off = 0
        while off < wlen:
            step = min(g, wlen - off)
            z = _zero_from(data, base + off, step)
            if z is not cur_z:
                if cur_z is not None:
                    runs.append((cur_off, wpos + off - cur_off, cur_z))
                cur_off = wpos + off
                cur_z = z
            off += step
        wpos += wlen
    runs.append((cur_off, n - cur_off, cur_z))
    return runs


def self_test(module):
    """Known answers every implementation must give; the loader runs it on the compiled module.

    Raises AssertionError naming the first function that gave a wrong answer.
    """

    def check(name, got, expected):
        if got != expected:
            raise AssertionError(
                "%s known answer failed: got %r, expected %r" % (name, got, expected)
            )

    def raises(name, exc, func, *args):
        try:
            func(*args)
        except exc:
            return
        except Exception as other:  # the wrong exception type is a wrong answer too
            raise AssertionError(
                "%s raised %r instead of %s" % (name, other, exc.__name__)
            ) from other
        raise AssertionError("%s did not raise %s" % (name, exc.__name__))

    bm = bytes([0b10110000, 0xFF, 0x00, 0x01])
    check(
        "bitmap_runs",
        module.bitmap_runs(bm, 0, 32),
        [
            (0, 1, True),
            (1, 1, False),
            (2, 2, True),
            (4, 4, False),
            (8, 8, True),
            (16, 15, False),
            (31, 1, True),
        ],
    )
    check("bitmap_runs", module.bitmap_runs(bm, 3, 7), [(3, 1, True), (4, 4, False), (8, 2, True)])
    check(
        "bitmap_runs", module.bitmap_runs(memoryview(bm)[1:], 2, 9), [(2, 6, True), (8, 3, False)]
    )
    check("bitmap_runs", module.bitmap_runs(bm, 40, 0), [])
    big = bytes(8) + b"\xff" * 16 + b"\x7f"
    check(
        "bitmap_runs",
        module.bitmap_runs(big, 1, 199),
        [(1, 63, False), (64, 128, True), (192, 1, False), (193, 7, True)],
    )
    check(
        "bitmap_runs",
        module.bitmap_runs(big, 60, 140),
        [(60, 4, False), (64, 128, True), (192, 1, False), (193, 7, True)],
    )
    raises("bitmap_runs", ValueError, module.bitmap_runs, bm, 1, 32)
    check("bitmap_count", module.bitmap_count(bm, 0, 32), 12)
    check("bitmap_count", module.bitmap_count(bm, 3, 7), 3)
    check("bitmap_count", module.bitmap_count(big, 5, 195), 135)
    check("bitmap_count", module.bitmap_count(bm, 2, 0), 0)
    raises("bitmap_count", ValueError, module.bitmap_count, bm, -1, 2)
    taken = bytearray([0b10000000, 0x0F, 0, 0])
    check("bitmap_claim", module.bitmap_claim(bm, taken), bytes([0b00110000, 0xF0, 0, 1]))
    check("bitmap_claim", taken, bytearray([0b10110000, 0xFF, 0, 1]))
    raises("bitmap_claim", ValueError, module.bitmap_claim, bm[:3], taken)
    raises("bitmap_claim", TypeError, module.bitmap_claim, bm, bytes(4))
    ones = b"\xff" * 4
    check(
        "block_runs",
        module.block_runs([None, bm, taken, ones], 0, 32),
        [(0, 1, 1), (1, 1, 3), (2, 2, 1), (4, 4, 3), (8, 8, 1), (16, 15, 3), (31, 1, 1)],
    )
    check(
        "block_runs",
        module.block_runs([bytes([0x0F, 0]), memoryview(bm)[:2], None], 3, 11),
        [(3, 1, 1), (4, 4, 0), (8, 6, 1)],
    )
    check("block_runs", module.block_runs((bm, bytes(4)), 16, 16), [(16, 15, -1), (31, 1, 0)])
    check("block_runs", module.block_runs([], 5, 3), [(5, 3, -1)])
    check("block_runs", module.block_runs([bm], 0, 0), [])
    raises("block_runs", ValueError, module.block_runs, [bm, None, bm[:3]], 0, 32)
    check("is_zero", module.is_zero(bytes(4096)), True)
    check("is_zero", module.is_zero(bytes(4095) + b"\x01"), False)
    check("is_zero", module.is_zero(b"\x01" + bytes(4095)), False)
    check("is_zero", module.is_zero(bytearray(b"\0\0\0x")), False)
    check("is_zero", module.is_zero(memoryview(b"\x01" + bytes(100))[1:]), True)
    check("is_zero", module.is_zero(b""), True)
    buf = bytes(8192) + b"x" * 4096 + bytes(100)
    check(
        "zero_runs",
        module.zero_runs(buf, 4096),
        [(0, 8192, True), (8192, 4096, False), (12288, 100, True)],
    )
    check(
        "zero_runs",
        module.zero_runs(memoryview(buf)[4096:], 3000),
        [(0, 3000, True), (3000, 5292, False)],
    )
    check("zero_runs", module.zero_runs(bytes(10), 3), [(0, 10, True)])
    check("zero_runs", module.zero_runs(b"", 512), [])
    raises("zero_runs", ValueError, module.zero_runs, buf, 0)
    raises("is_zero", ValueError, module.is_zero, memoryview(buf)[::2])
