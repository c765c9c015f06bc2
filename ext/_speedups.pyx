# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled hot loops of the agent (agent._speedups).

Every function has a pure-Python twin with the same name, signature, results and exceptions in
agent/_pyspeedups.py (the contract and its documentation live there); agent/speedups.py picks one.
Buffers are any C-contiguous buffer, read as raw bytes; bitmaps are MSB-first VHD sector bitmaps.
Loops over large buffers run without the GIL so that other threads (network I/O) keep going.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.number cimport PyNumber_Index
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* A zero page that stays in L1 while buffers are compared against it. */
    static const unsigned char fp_zero_page[4096];

    static int fp_is_zero(const unsigned char *p, Py_ssize_t n)
    {
        Py_ssize_t i, head = n < 16 ? n : 16;
        /* Most non-zero data differs in its first bytes: reject that cheaply. */
        for (i = 0; i < head; i++)
            if (p[i])
                return 0;
        p += head;
        n -= head;
        while (n >= 4096) {
            if (memcmp(p, fp_zero_page, 4096) != 0)
                return 0;
            p += 4096;
            n -= 4096;
        }
        return n == 0 || memcmp(p, fp_zero_page, (size_t)n) == 0;
    }

    static inline uint64_t fp_load64(const unsigned char *p)
    {
        uint64_t w;
        memcpy(&w, p, 8);
        return w;
    }

    /* Index of the first non-zero byte of p[0:n), or n. */
    static Py_ssize_t fp_first_nonzero(const unsigned char *p, Py_ssize_t n)
    {
        Py_ssize_t i = 0, head = n < 16 ? n : 16;
        for (; i < head; i++)
            if (p[i])
                return i;
        while (n - i >= 4096 && memcmp(p + i, fp_zero_page, 4096) == 0)
            i += 4096;
        while (n - i >= 8 && fp_load64(p + i) == 0)
            i += 8;
        for (; i < n; i++)
            if (p[i])
                return i;
        return n;
    }

    /* Zero-ness of each granule of p[0:n): flags[i] = 1 if granule i is all zero. Zero stretches are
       skipped many granules at a time; a non-zero granule costs the scan up to its first non-zero byte. */
    static void fp_zero_flags(const unsigned char *p, Py_ssize_t n, Py_ssize_t g, unsigned char *flags)
    {
        Py_ssize_t pos = 0, ngran = (n + g - 1) / g;
        while (pos < n) {
            Py_ssize_t nz = pos + fp_first_nonzero(p + pos, n - pos);
            Py_ssize_t gi = pos / g, gz = nz / g;
            if (nz >= n) {
                memset(flags + gi, 1, (size_t)(ngran - gi));
                return;
            }
            memset(flags + gi, 1, (size_t)(gz - gi));
            flags[gz] = 0;
            pos = (gz + 1) * g;
        }
    }

    /* First bit index in [pos, end) whose value differs from v (0 or 1), or end. MSB-first bits. */
    static Py_ssize_t fp_run_end(const unsigned char *bm, Py_ssize_t pos, Py_ssize_t end, int v)
    {
        const unsigned int flip = v ? 0xFFu : 0u;
        const uint64_t flip64 = v ? ~(uint64_t)0 : 0;
        while (pos < end) {
            if ((pos & 7) == 0) {
                /* Byte-aligned: skip whole words, then whole bytes, of the run's value. */
                while (pos + 64 <= end && fp_load64(bm + (pos >> 3)) == flip64)
                    pos += 64;
                while (pos + 8 <= end && bm[pos >> 3] == flip)
                    pos += 8;
                if (pos >= end)
                    return end;
            }
            {
                unsigned int diff = (bm[pos >> 3] ^ flip) & (0xFFu >> (pos & 7));
                if (diff) {
                    Py_ssize_t at = (pos & ~(Py_ssize_t)7) + (__builtin_clz(diff) - 24);
                    return at < end ? at : end;
                }
                pos = (pos | 7) + 1;
            }
        }
        return end;
    }

    static Py_ssize_t fp_popcount(const unsigned char *bm, Py_ssize_t first, Py_ssize_t count)
    {
        Py_ssize_t stop = first + count, i0 = first >> 3, i1 = (stop - 1) >> 3, i, total = 0;
        unsigned int head = 0xFFu >> (first & 7);
        unsigned int tail = (0xFF00u >> (((stop - 1) & 7) + 1)) & 0xFFu;
        if (i0 == i1)
            return __builtin_popcount(bm[i0] & head & tail);
        total = __builtin_popcount(bm[i0] & head) + __builtin_popcount(bm[i1] & tail);
        i = i0 + 1;
        for (; i + 8 <= i1; i += 8)
            total += __builtin_popcountll(fp_load64(bm + i));
        for (; i < i1; i++)
            total += __builtin_popcount(bm[i]);
        return total;
    }

    /* Index of the first level whose bit pos is set, or -1 (NULL levels lack the block). */
    static Py_ssize_t fp_level_at(const unsigned char *const *bms, Py_ssize_t nlev, Py_ssize_t pos)
    {
        Py_ssize_t k;
        for (k = 0; k < nlev; k++)
            if (bms[k] != NULL && ((bms[k][pos >> 3] >> (7 - (pos & 7))) & 1))
                return k;
        return -1;
    }

    /* End of the run starting at pos whose supplying level is `level` (-1: none), bounded by end. */
    static Py_ssize_t fp_level_run_end(const unsigned char *const *bms, Py_ssize_t nlev, Py_ssize_t pos,
                                       Py_ssize_t end, Py_ssize_t level)
    {
        Py_ssize_t k, upto = level < 0 ? nlev : level;
        for (k = 0; k < upto && end > pos + 1; k++)
            if (bms[k] != NULL)
                end = fp_run_end(bms[k], pos, end, 0);
        if (level >= 0 && end > pos + 1)
            end = fp_run_end(bms[level], pos, end, 1);
        return end;
    }

    /* out = b & ~t; t |= b (n bytes; b does not overlap t or out). */
    static void fp_claim(const unsigned char *b, unsigned char *t, unsigned char *out, Py_ssize_t n)
    {
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            unsigned char bb = b[i], tt = t[i];
            out[i] = (unsigned char)(bb & ~tt);
            t[i] = (unsigned char)(tt | bb);
        }
    }
    """
    int fp_is_zero(const unsigned char *p, Py_ssize_t n) nogil
    void fp_zero_flags(const unsigned char *p, Py_ssize_t n, Py_ssize_t g, unsigned char *flags) nogil
    Py_ssize_t fp_run_end(const unsigned char *bm, Py_ssize_t pos, Py_ssize_t end, int v) nogil
    Py_ssize_t fp_popcount(const unsigned char *bm, Py_ssize_t first, Py_ssize_t count) nogil
    void fp_claim(const unsigned char *b, unsigned char *t, unsigned char *out, Py_ssize_t n) nogil
    Py_ssize_t fp_level_at(const unsigned char **bms, Py_ssize_t nlev, Py_ssize_t pos) nogil
    Py_ssize_t fp_level_run_end(const unsigned char **bms, Py_ssize_t nlev, Py_ssize_t pos,
                                Py_ssize_t end, Py_ssize_t level) nogil

# Buffers at least this long are scanned without the GIL (below it, releasing costs more than it gives).
cdef enum:
    NOGIL_MIN = 262144


cdef const unsigned char[::1] _view(object buf):
    """Raw bytes of a C-contiguous buffer (ValueError otherwise), as the pure twin's _view."""
    cdef const unsigned char[::1] v
    if type(buf) is bytes or type(buf) is bytearray:
        v = buf
        return v
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    v = mv
    return v


cdef unsigned char[::1] _writable_view(object buf):
    cdef unsigned char[::1] v
    if type(buf) is bytearray:
        v = buf
        return v
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    if mv.readonly:
        raise TypeError("taken must be a writable buffer (a bytearray)")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    v = mv
    return v


cdef inline void _check_range(Py_ssize_t nbytes, object first, object count) except *:
    if first < 0 or first + count > nbytes * 8:
        raise ValueError(
            "bit range [%d, %d) outside a %d-byte bitmap" % (first, first + count, nbytes)
        )


def bitmap_runs(bitmap, first, count):
    """Runs of equal bits in bits [first, first + count) as a list of (start, length, is_set)."""
    first = PyNumber_Index(first)
    count = PyNumber_Index(count)
    if count <= 0:
        return []
    cdef const unsigned char[::1] bm = _view(bitmap)
    _check_range(bm.shape[0], first, count)
    cdef Py_ssize_t pos = first
    cdef Py_ssize_t end = pos + <Py_ssize_t>count
    cdef Py_ssize_t nxt
    cdef const unsigned char *p = &bm[0]
    cdef int v
    runs = []
    while pos < end:
        v = (p[pos >> 3] >> (7 - (pos & 7))) & 1
        nxt = fp_run_end(p, pos, end, v)
        runs.append((pos, nxt - pos, v == 1))
        pos = nxt
    return runs


def bitmap_count(bitmap, first, count):
    """Number of set bits in bits [first, first + count)."""
    first = PyNumber_Index(first)
    count = PyNumber_Index(count)
    if count <= 0:
        return 0
    cdef const unsigned char[::1] bm = _view(bitmap)
    _check_range(bm.shape[0], first, count)
    return fp_popcount(&bm[0], first, count)


def bitmap_claim(bitmap, taken):
    """Return bitmap & ~taken (bytes) and set taken |= bitmap in place (taken: a bytearray)."""
    cdef unsigned char[::1] t = _writable_view(taken)
    cdef const unsigned char[::1] b = _view(bitmap)
    cdef Py_ssize_t n = t.shape[0]
    if b.shape[0] < n:
        raise ValueError("bitmap (%d bytes) shorter than the taken mask (%d bytes)" % (b.shape[0], n))
    out = PyBytes_FromStringAndSize(NULL, n)
    if n == 0:
        return out
    cdef unsigned char *o = <unsigned char *>PyBytes_AS_STRING(out)
    cdef const unsigned char *bp = &b[0]
    cdef unsigned char *tp = &t[0]
    cdef unsigned char *copy = NULL
    if bp < tp + n and tp < bp + n:
        # bitmap and taken share memory: read the bitmap before taken changes, like the twin.
        copy = <unsigned char *>malloc(n)
        if copy == NULL:
            raise MemoryError()
        memcpy(copy, bp, n)
        bp = copy
    try:
        fp_claim(bp, tp, o, n)
    finally:
        free(copy)
    return out


def block_runs(bitmaps, first, count):
    """Runs (start, length, level) of the first level (leaf first) with each bit set; -1: none."""
    first = PyNumber_Index(first)
    count = PyNumber_Index(count)
    levels = list(bitmaps)
    if count <= 0:
        return []
    cdef Py_ssize_t nlev = len(levels)
    cdef Py_ssize_t i
    cdef const unsigned char[::1] v
    keep = []  # the views, alive (and their buffers held) while the pointers are used
    for i in range(nlev):
        if levels[i] is not None:
            v = _view(levels[i])
            _check_range(v.shape[0], first, count)
            keep.append(v)
    cdef const unsigned char **bms = <const unsigned char **>malloc((nlev if nlev else 1) * sizeof(void *))
    if bms == NULL:
        raise MemoryError()
    cdef Py_ssize_t pos = first
    cdef Py_ssize_t end = pos + <Py_ssize_t>count
    cdef Py_ssize_t nxt, level, j = 0
    try:
        for i in range(nlev):
            if levels[i] is None:
                bms[i] = NULL
            else:
                v = keep[j]
                j += 1
                bms[i] = &v[0]
        runs = []
        while pos < end:
            level = fp_level_at(bms, nlev, pos)
            nxt = fp_level_run_end(bms, nlev, pos, end, level)
            runs.append((pos, nxt - pos, level))
            pos = nxt
        return runs
    finally:
        free(bms)


def is_zero(buf):
    """True if every byte of buf is zero (True for an empty buffer)."""
    cdef const unsigned char[::1] v = _view(buf)
    cdef Py_ssize_t n = v.shape[0]
    cdef int z
    if n == 0:
        return True
    if n < NOGIL_MIN:
        return fp_is_zero(&v[0], n) != 0
    with nogil:
        z = fp_is_zero(&v[0], n)
    return z != 0


def zero_runs(buf, granularity):
    """Runs of all-zero / not-all-zero granules of buf: list of (offset, length, is_zero)."""
    granularity = PyNumber_Index(granularity)
    if granularity <= 0:
        raise ValueError("granularity must be positive")
    cdef const unsigned char[::1] v = _view(buf)
    cdef Py_ssize_t n = v.shape[0]
    if n == 0:
        return []
    cdef Py_ssize_t g = n if granularity >= n else <Py_ssize_t>granularity
    cdef Py_ssize_t ngran = (n + g - 1) // g
    cdef Py_ssize_t i, start
    cdef const unsigned char *p = &v[0]
    cdef unsigned char *flags = <unsigned char *>malloc(ngran)
    if flags == NULL:
        raise MemoryError()
    try:
        if n < NOGIL_MIN:
            fp_zero_flags(p, n, g, flags)
        else:
            with nogil:
                fp_zero_flags(p, n, g, flags)
        runs = []
        start = 0
        for i in range(1, ngran):
            if flags[i] != flags[start]:
                runs.append((start * g, (i - start) * g, flags[start] == 1))
                start = i
        runs.append((start * g, n - start * g, flags[start] == 1))
        return runs
    finally:
        free(flags)
