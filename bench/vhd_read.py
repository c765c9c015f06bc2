"""VHD library read speed vs `cat` of the same files, page cache warm, in one run.

Builds a dynamic VHD (default 4 GiB, half of its 2 MiB blocks allocated) holding realistic-ish data
(text from the Python standard library's sources, random bytes, zero runs, mixed inside blocks), and
the same guest data as a 3-deep chain (root + two differencing levels; some blocks live whole in one
level, others are split across levels at 4 KiB..256 KiB granularity and must be assembled). Then, for
the flat file and the chain:

  cat            `cat FILES > /dev/null` (every file of the chain), the baseline
  block_source   what the NBD/HTTP servers do: per block, block_source(); 'file' -> preadv of the
                 whole block into a reused buffer, 'assemble' -> read_block_into the same buffer,
                 'zero' -> nothing
  read_block     chain.read_block(i) for every non-zero block (a new bytes object per block)
  extents        chain.extents() of the whole disk (what BLOCK_STATUS / the HTTP map ask), in ms

and prints GB/s of guest data delivered (allocated blocks only) and the ratios. Goals (issue 2):
block_source path >= 0.5x cat with the compiled speedups; chain time <= 1.2x flat time. Every number
is the best of --rounds; the rounds alternate flat and chain so that noise from a busy machine lands
on both.

    .venv/bin/python -m bench.vhd_read                # 4 GiB (needs ~6 GiB in --dir)
    .venv/bin/python -m bench.vhd_read --quick        # 512 MiB, best of 5
    .venv/bin/python -m bench.vhd_read --size 1G --dir /var/tmp --keep
"""

import argparse
import glob
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from agent import speedups, vhd

MiB = 1 << 20
BLOCK = 2 * MiB


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def text_corpus(limit=32 * MiB):
    """Real text: the standard library's Python sources."""
    out = bytearray()
    for path in sorted(
        glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True)
    ):
        try:
            with open(path, "rb") as f:
                out += f.read()
        except OSError:
            continue
        if len(out) >= limit:
            break
    return bytes(out)


def make_block(rng, corpus):
    """2 MiB mixing text, random and zero runs (64 KiB pieces)."""
    parts = []
    for _ in range(BLOCK // (64 * 1024)):
        kind = rng.random()
        if kind < 0.45:
            start = rng.randrange(0, len(corpus) - 65536)
            parts.append(corpus[start : start + 65536])
        elif kind < 0.75:
            parts.append(rng.randbytes(65536))
        else:
            parts.append(bytes(65536))
    return b"".join(parts)


def build(directory, size, seed=1):
    rng = random.Random(seed)
    corpus = text_corpus()
    nblocks = size // BLOCK
    allocated = sorted(rng.sample(range(nblocks), nblocks // 2))
    flat = os.path.join(directory, "flat.vhd")
    root = os.path.join(directory, "root.vhd")
    mid = os.path.join(directory, "mid.vhd")
    leaf = os.path.join(directory, "leaf.vhd")
    plan = {}
    for b in allocated:
        r = rng.random()
        # where the block lives: whole in one level (most), or split (root + pieces above)
        plan[b] = "root" if r < 0.5 else "mid" if r < 0.7 else "leaf" if r < 0.85 else "split"
    wf = vhd.create_dynamic(flat, size)
    writers = {}
    writers["root"] = vhd.create_dynamic(root, size)
    blocks = {}
    for b in allocated:
        data = make_block(rng, corpus)
        blocks[b] = data
        wf.write(b * BLOCK, data)
        if plan[b] in ("root", "split"):
            writers["root"].write(b * BLOCK, data)
    wf.close()
    writers["root"].close()
    writers["mid"] = vhd.create_differencing(mid, root)
    for b in allocated:
        if plan[b] == "mid":
            writers["mid"].write(b * BLOCK, blocks[b])
        elif plan[b] == "split":
            for _ in range(rng.randint(1, 6)):
                off = rng.randrange(0, BLOCK // 4096) * 4096
                ln = min(rng.choice([4096, 65536, 262144]), BLOCK - off)
                writers["mid"].write(b * BLOCK + off, blocks[b][off : off + ln])
    writers["mid"].close()
    writers["leaf"] = vhd.create_differencing(leaf, mid)
    for b in allocated:
        if plan[b] == "leaf":
            writers["leaf"].write(b * BLOCK, blocks[b])
        elif plan[b] == "split":
            for _ in range(rng.randint(1, 6)):
                off = rng.randrange(0, BLOCK // 4096) * 4096
                ln = min(rng.choice([4096, 65536, 262144]), BLOCK - off)
                writers["leaf"].write(b * BLOCK + off, blocks[b][off : off + ln])
    writers["leaf"].close()
    return flat, [leaf, mid, root], allocated


def cat(paths):
    t = time.perf_counter()
    subprocess.run("cat %s > /dev/null" % " ".join(paths), shell=True, check=True)
    return time.perf_counter() - t


def via_block_source(chain):
    buf = bytearray(chain.block_size)
    view = memoryview(buf)
    preadv = getattr(os, "preadv", None)
    read_block_into = getattr(chain, "read_block_into", None)  # read_into before it existed
    delivered = 0
    kinds = {"zero": 0, "file": 0, "assemble": 0}
    t = time.perf_counter()
    for i in range(chain.block_count):
        src = chain.block_source(i)
        kinds[src.kind] += 1
        if src.kind == "zero":
            continue
        if src.kind == "file":
            if preadv is not None:
                n = preadv(src.file.fileno(), [view[: src.length]], src.offset)
            else:
                n = len(os.pread(src.file.fileno(), src.length, src.offset))
            assert n == src.length
        elif read_block_into is not None:
            read_block_into(i, buf)
        else:
            chain.read_into(i * chain.block_size, view[: src.length])
        delivered += src.length
    return time.perf_counter() - t, delivered, kinds


def via_read_block(chain, blocks):
    t = time.perf_counter()
    n = 0
    for i in blocks:
        n += len(chain.read_block(i))
    return time.perf_counter() - t, n


def verify(flat_chain, chain, blocks, rng):
    for i in rng.sample(blocks, min(32, len(blocks))):
        if flat_chain.read_block(i) != chain.read_block(i):
            sys.exit("chain and flat differ at block %d: the bench data is wrong" % i)


def cpu_now():
    """CPU seconds used so far by this process and its finished children (cat)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + r.ru_utime + r.ru_stime


def gbps(nbytes, seconds):
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="4G", help="virtual size (default 4G)")
    ap.add_argument("--quick", action="store_true", help="512 MiB, best of 5")
    ap.add_argument("--dir", default=None, help="where to build the files (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument(
        "--rounds", type=int, default=None, help="best of N for every measurement (3; --quick: 5)"
    )
    args = ap.parse_args(argv)
    size = 512 * MiB if args.quick else parse_size(args.size)
    size -= size % BLOCK
    rounds = args.rounds or (5 if args.quick else 3)
    directory = tempfile.mkdtemp(prefix="vhd-read-bench-", dir=args.dir)
    try:
        t = time.perf_counter()
        flat, chain_paths, allocated = build(directory, size)
        print(
            "built %s flat + 3-deep chain in %.1fs (%d of %d blocks allocated); speedups: %s"
            % (
                _human(size),
                time.perf_counter() - t,
                len(allocated),
                size // BLOCK,
                "compiled" if speedups.COMPILED else "pure Python",
            )
        )
        print(
            "data: stdlib .py text, random bytes and zero runs in 64 KiB pieces; chain: 50% of blocks "
            "whole in the root, 20% in the middle, 15% in the leaf, 15% split across levels"
        )
        best = {}  # (name, what) -> best seconds
        nbytes = {}
        kinds = {}

        def keep(key, seconds):
            best[key] = min(best.get(key, seconds), seconds)

        with vhd.open_chain(flat) as fc, vhd.open_chain(chain_paths[0]) as cc:
            verify(fc, cc, allocated, random.Random(2))
            sets = (("flat", fc, [flat]), ("chain", cc, chain_paths))
            for _name, _c, files in sets:
                cat(files)  # warm the page cache
            # Rounds interleave flat and chain, so load from elsewhere on the machine hits both alike.
            # CPU time is kept too: waiting for a CPU on a busy machine does not count in it.
            for _ in range(rounds):
                for name, c, files in sets:
                    u = cpu_now()
                    keep((name, "cat"), cat(files))
                    keep((name, "cat cpu"), cpu_now() - u)
                    u = cpu_now()
                    t_src, nbytes[name], kinds[name] = via_block_source(c)
                    keep((name, "src cpu"), cpu_now() - u)
                    keep((name, "src"), t_src)
                    u = cpu_now()
                    keep((name, "rb"), via_read_block(c, allocated)[0])
                    keep((name, "rb cpu"), cpu_now() - u)
                    t = time.perf_counter()
                    c.extents()
                    keep((name, "ext"), time.perf_counter() - t)
        results = {}
        for name in ("flat", "chain"):
            results[name] = (
                best[(name, "cat")],
                best[(name, "src")],
                best[(name, "rb")],
                nbytes[name],
                kinds[name],
            )
        print(
            "%-6s %10s %14s %12s %12s %10s  %s"
            % ("", "cat GB/s", "block_source", "read_block", "extents ms", "src/cat", "block kinds")
        )
        for name in ("flat", "chain"):
            t_cat, t_src, t_rb, n, k = results[name]
            print(
                "%-6s %10.2f %14.2f %12.2f %12.3f %9.2fx  %s"
                % (
                    name,
                    gbps(n, t_cat),
                    gbps(n, t_src),
                    gbps(n, t_rb),
                    best[(name, "ext")] * 1e3,
                    t_cat / t_src,
                    k,
                )
            )
        print(
            "CPU ms   %8s %14s %12s   (cat: the cat process; best of %d)"
            % ("cat", "block_source", "read_block", rounds)
        )
        for name in ("flat", "chain"):
            print(
                "%-6s %10.1f %14.1f %12.1f"
                % tuple([name] + [best[(name, w)] * 1e3 for w in ("cat cpu", "src cpu", "rb cpu")])
            )
        ratio = results["chain"][1] / results["flat"][1]
        ratio_rb = results["chain"][2] / results["flat"][2]
        print(
            "chain/flat time: block_source %.2fx, read_block %.2fx (goal <= 1.2x)"
            % (ratio, ratio_rb)
        )
        print(
            "chain/flat CPU: block_source %.2fx, read_block %.2fx"
            % (
                best[("chain", "src cpu")] / best[("flat", "src cpu")],
                best[("chain", "rb cpu")] / best[("flat", "rb cpu")],
            )
        )
        print(
            "flat block_source vs cat: %.2fx of cat's speed (goal >= 0.5x)"
            % (results["flat"][0] / results["flat"][1])
        )
    finally:
        if args.keep:
            print("files kept in", directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _human(n):
    return "%.1f GiB" % (n / float(1 << 30)) if n >= 1 << 30 else "%d MiB" % (n >> 20)


if __name__ == "__main__":
    sys.exit(main())
