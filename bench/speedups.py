"""Micro-benchmark of the speedups: compiled (agent._speedups) vs pure twins (agent._pyspeedups).

Realistic inputs: 512-byte sector bitmaps of a 2 MiB VHD block (all set, all clear, sparse 4 KiB
writes, alternating bits as the worst case), one block's bitmaps across a chain (block_runs), and
2 MiB block buffers (zero, non-zero, zero with one byte
set at the end). Both implementations run on the same inputs in the same process; the script prints
time per call and the pure/compiled ratio. It also checks that a nogil scan lets another thread run.

    .venv/bin/python -m bench.speedups            # full run (a few seconds per line)
    .venv/bin/python -m bench.speedups --quick    # smoke run
"""

import argparse
import os
import random
import sys
import threading
import time

from agent import _pyspeedups as pure

try:
    from agent import _speedups as compiled
except ImportError as exc:  # pragma: no cover - reported, not hidden
    sys.exit("agent._speedups is not built (make ext): %s" % exc)

BLOCK = 2 * 1024 * 1024
BITMAP = 512


def bitmaps():
    rng = random.Random(1)
    sparse = bytearray(BITMAP)
    for _ in range(16):  # 16 scattered 4 KiB writes (8 sectors each, byte-aligned)
        sparse[rng.randrange(BITMAP)] = 0xFF
    ragged = bytearray(BITMAP)
    for _ in range(64):  # 64 writes of 1..16 sectors at any sector
        start = rng.randrange(BITMAP * 8 - 16)
        for bit in range(start, start + rng.randint(1, 16)):
            ragged[bit >> 3] |= 0x80 >> (bit & 7)
    return [
        ("all set", b"\xff" * BITMAP),
        ("all clear", bytes(BITMAP)),
        ("sparse 4K", bytes(sparse)),
        ("ragged", bytes(ragged)),
        ("alternating", b"\xaa" * BITMAP),
    ]


def buffers():
    nonzero = os.urandom(BLOCK)
    tail = bytearray(BLOCK)
    tail[-1] = 1
    half = bytearray(BLOCK)
    half[BLOCK // 2 :] = nonzero[BLOCK // 2 :]
    return [
        ("zero 2M", bytes(BLOCK)),
        ("random 2M", nonzero),
        ("last byte 2M", bytes(tail)),
        ("half zero 2M", bytes(half)),
        ("zero 2M memoryview", memoryview(bytearray(BLOCK))),
    ]


def per_call(func, args, budget):
    """Seconds per call: repeat batches until `budget` seconds are spent; keep the best batch."""
    func(*args)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            func(*args)
        dt = time.perf_counter() - t0
        if dt > budget / 10 or n >= 1 << 20:
            break
        n *= 4
    best = dt / n
    spent = dt
    while spent < budget:
        t0 = time.perf_counter()
        for _ in range(n):
            func(*args)
        dt = time.perf_counter() - t0
        spent += dt
        best = min(best, dt / n)
    return best


def fmt(seconds):
    if seconds < 1e-3:
        return "%8.2f us" % (seconds * 1e6)
    return "%8.2f ms" % (seconds * 1e3)


def row(label, name, args, budget, nbytes=None):
    tp = per_call(getattr(pure, name), args, budget)
    tc = per_call(getattr(compiled, name), args, budget)
    rate = ""
    if nbytes:
        rate = "  compiled %6.2f GB/s, pure %6.2f GB/s" % (nbytes / tc / 1e9, nbytes / tp / 1e9)
    print(
        "%-13s %-22s pure %s  compiled %s  ratio %7.1fx%s"
        % (name, label, fmt(tp), fmt(tc), tp / tc, rate)
    )


def gil_check(budget):
    """Count how far a pure-Python thread gets while the main thread scans 2 MiB zero buffers."""
    buf = bytes(BLOCK)
    counts = {}
    for label, mod in (("pure", pure), ("compiled", compiled)):
        stop = threading.Event()
        ticks = [0]

        def spin(ticks=ticks, stop=stop):
            while not stop.is_set():
                ticks[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        end = time.perf_counter() + budget
        calls = 0
        while time.perf_counter() < end:
            mod.is_zero(buf)
            calls += 1
        stop.set()
        t.join()
        counts[label] = (calls, ticks[0])
    for label, (calls, ticks) in counts.items():
        print(
            "gil: %-8s is_zero(2M) calls %7d, other thread loop iterations %10d"
            % (label, calls, ticks)
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short budget per line (smoke run)")
    opts = ap.parse_args()
    budget = 0.05 if opts.quick else 0.5
    pure.self_test(compiled)
    print("seconds per call, best of repeated batches; ratio = pure / compiled")
    for label, bm in bitmaps():
        row(label, "bitmap_runs", (bm, 0, BITMAP * 8), budget)
        row(label, "bitmap_count", (bm, 0, BITMAP * 8), budget)
        row(label, "bitmap_claim", (bm, bytearray(b"\x0f" * BITMAP)), budget)
    row("sparse 4K, bits 3..4000", "bitmap_runs", (bitmaps()[2][1], 3, 3997), budget)
    named = dict(bitmaps())
    chains = [
        ("leaf/mid/full base", [named["sparse 4K"], named["ragged"], named["all set"]]),
        ("absent/sparse/none", [None, named["sparse 4K"], None]),
        ("3 x ragged", [named["ragged"], named["sparse 4K"], named["ragged"]]),
        (
            "16 deep, full root",
            [None, named["sparse 4K"]] * 7 + [named["ragged"], named["all set"]],
        ),
    ]
    for label, levels in chains:
        row(label, "block_runs", (levels, 0, BITMAP * 8), budget)
    for label, buf in buffers():
        row(label, "is_zero", (buf,), budget, BLOCK)
        row(label + " /4K", "zero_runs", (buf, 4096), budget, BLOCK)
    row("random 2M /64K", "zero_runs", (buffers()[1][1], 65536), budget, BLOCK)
    gil_check(budget * 2)


if __name__ == "__main__":
    main()
