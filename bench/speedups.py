"""Micro-benchmark of the speedups: compiled (agent._speedups) vs pure twins (agent._pyspeedups).

Realistic inputs: 512-byte sector bitmaps of a 2 MiB VHD block (all set, all clear, sparse 4 KiB
writes, alternating bits as the worst case), one block's bitmaps across a chain (block_runs), and
2 MiB block buffers (zero, non-zero, zero with one byte
set at the end). Both implementations run on the same inputs in the same process; the script prints
time per call and the pure/compiled ratio. It also checks that a nogil scan lets another thread run.

    .venv/bin/python -m bench.speedups            # full run (a few seconds per line)
    .venv/bin/python -m bench.speedups --quick    # smoke run
    .venv/bin/python -m bench.speedups --chain    # chain reads (agent.vhd), compiled vs pure twins

--chain builds a 3-deep chain (base: every other 2 MiB block full; middle: scattered 4 KiB writes;
leaf: scattered 64 KiB writes) and times Chain.read_block over every block, Chain.extents() and
Chain.block_source over every block, in two child processes: one on the compiled module and one with
FASTPATH_PURE=1. It shows how much of a chain read the speedups decide (little: I/O and buffer
allocation dominate read_block; the per-block Python resolution dominates extents/block_source).
"""

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
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


def _spin_peer(stop, ticks):
    """A CPU-bound Python thread: it only runs when it holds the GIL."""
    while not stop.is_set():
        ticks[0] += 1


def _io_peer(stop, ticks):
    """An I/O-bound thread (like a connection handler): 1-byte round trips over a socketpair."""
    a, b = socket.socketpair()
    try:
        while not stop.is_set():
            a.send(b"x")
            b.recv(1)
            ticks[0] += 1
    finally:
        a.close()
        b.close()


def gil_check(budget):
    """How far another thread gets while this one scans 2 MiB zero buffers with is_zero.

    The compiled scan releases the GIL (buffers >= 256 KiB), the pure one cannot: a peer thread gets
    more done beside the compiled scan, at the price of the scanning thread waiting to get the GIL
    back (up to the 5 ms switch interval when the peer is CPU-bound).
    """
    buf = bytes(BLOCK)
    for peer_name, peer in (("cpu-bound", _spin_peer), ("socket i/o", _io_peer)):
        for label, mod in (("pure", pure), ("compiled", compiled)):
            stop = threading.Event()
            ticks = [0]
            t = threading.Thread(target=peer, args=(stop, ticks))
            t.start()
            end = time.perf_counter() + budget
            calls = 0
            while time.perf_counter() < end:
                mod.is_zero(buf)
                calls += 1
            stop.set()
            t.join(30)
            print(
                "gil: %-8s is_zero(2M) calls/s %8.0f   %-10s peer iterations/s %10.0f"
                % (label, calls / budget, peer_name, ticks[0] / budget)
            )


def build_chain(directory, size):
    from agent.vhd import create_differencing, create_dynamic

    rng = random.Random(7)
    payload = os.urandom(BLOCK)
    base, mid, leaf = (os.path.join(directory, n) for n in ("base.vhd", "mid.vhd", "leaf.vhd"))
    w = create_dynamic(base, size)
    for b in range(0, size // BLOCK, 2):
        w.write(b * BLOCK, payload)
    w.close()
    w = create_differencing(mid, base)
    for _ in range(size // BLOCK * 8):
        w.write(rng.randrange(size // 4096) * 4096, payload[:4096])
    w.close()
    w = create_differencing(leaf, mid)
    for _ in range(size // BLOCK):
        w.write(rng.randrange(size // 65536) * 65536, payload[:65536])
    w.close()
    return leaf


def chain_child(leaf, reps):
    """Runs in a child process: time chain operations on whichever implementation was loaded."""
    from agent import speedups
    from agent.vhd import open_chain

    def best(func):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            func()
            times.append(time.perf_counter() - t0)
        return min(times)

    with open_chain(leaf) as c:
        blocks = range(c.block_count)
        t_read = best(lambda: [c.read_block(i) for i in blocks])
        t_ext = best(c.extents)
        t_src = best(lambda: [c.block_source(i) for i in blocks])
        print(
            "%s %.6f %.6f %.6f %d"
            % ("compiled" if speedups.COMPILED else "pure", t_read, t_ext, t_src, c.size)
        )


def chain_bench(size_mib, reps):
    with tempfile.TemporaryDirectory(prefix="bench-speedups-") as d:
        leaf = build_chain(d, size_mib << 20)
        results = {}
        for label, extra in (("compiled", {"FASTPATH_REQUIRE_SPEEDUPS": "1"}), ("pure", {})):
            env = dict(os.environ, **extra)
            env.pop("FASTPATH_PURE", None)
            if label == "pure":
                env["FASTPATH_PURE"] = "1"
            out = subprocess.run(
                [sys.executable, "-m", "bench.speedups", "--chain-child", leaf, str(reps)],
                env=env,
                stdout=subprocess.PIPE,
                check=True,
                universal_newlines=True,
                timeout=1800,
            ).stdout.split()
            results[label] = [float(x) for x in out[1:4]]
            size = int(out[4])
        print("3-deep chain of %d MiB, best of %d" % (size >> 20, reps))
        names = ("read_block, every block", "extents()", "block_source, every block")
        for i, name in enumerate(names):
            tc, tp = results["compiled"][i], results["pure"][i]
            print(
                "%-26s pure %9.2f ms  compiled %9.2f ms  ratio %5.2fx"
                % (name, tp * 1e3, tc * 1e3, tp / tc)
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short budget per line (smoke run)")
    ap.add_argument("--chain", action="store_true", help="time chain operations instead")
    ap.add_argument("--size-mib", type=int, default=512, help="chain size for --chain")
    ap.add_argument("--chain-child", nargs=2, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.chain_child:
        chain_child(opts.chain_child[0], int(opts.chain_child[1]))
        return
    if opts.chain:
        chain_bench(opts.size_mib, 2 if opts.quick else 5)
        return
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
