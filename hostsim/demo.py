"""`make demo`: the main job on built-in data, checked by tools we did not write.

Today it:
  1. builds a file SR holding a 3-deep VHD chain (a base disk, a snapshot level, a leaf) with the
     agent's VHD writer, filled with disk-like data (text, binary records, random, zero runs) and
     with writes at unaligned sector offsets, so blocks are split across levels;
  2. writes the chain out locally as raw (sparse) and as one dynamic VHD, and has qemu-img and libvhdi read the
     VHD and compare both with each other and our own bytes with the in-memory model;
  3. starts the agent (`fastpath-agent serve`) on that SR, opens a ticket, and reads the disk over
     NBD with nbdinfo (the allocation map) and nbdcopy (the data), compared with qemu-img;
  4. prints a summary.
Usage: python -m hostsim.demo [--size MiB] [--workdir DIR] [--keep]
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from agent import speedups, vhd
from hostsim import guest

MiB = 1 << 20
BLOCK = 2 * MiB


class DemoError(Exception):
    pass


def run(cmd, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise DemoError("%s failed (%d): %s" % (cmd[0], proc.returncode, proc.stderr.strip()))
    return proc.stdout


def step(msg):
    print("==> %s" % msg, flush=True)


def fill(rng, n):
    """n bytes that look like a disk: mostly text and binary records, some random and zero runs."""
    kind = rng.choices(["text", "binary", "random", "zeros"], weights=[4, 3, 2, 1])[0]
    if kind == "text":
        return guest.text_bytes(rng, n)
    if kind == "binary":
        return guest.binary_bytes(rng, n)
    if kind == "random":
        return guest.random_bytes(rng, n)
    return bytes(n)


def build_chain(sr_dir, size, rng):
    """Three levels, root first; returns (vdi uuids root first, model bytearray of the leaf)."""
    model = bytearray(size)
    vdis = [str(uuid.uuid4()) for _ in range(3)]
    paths = [os.path.join(sr_dir, v + ".vhd") for v in vdis]
    nblocks = size // BLOCK
    # level 0: about half the blocks, whole and partial
    with vhd.create_dynamic(paths[0], size) as w:
        for b in rng.sample(range(nblocks), nblocks // 2):
            n = BLOCK if rng.random() < 0.7 else rng.randrange(1, BLOCK // 4096) * 4096
            data = fill(rng, n)
            w.write(b * BLOCK, data)
            model[b * BLOCK : b * BLOCK + n] = data
    # levels 1 and 2: snapshots' worth of guest writes, some not sector-run aligned
    for level in (1, 2):
        with vhd.create_differencing(paths[level], paths[level - 1]) as w:
            for _ in range(nblocks // 6):
                off = rng.randrange(0, size - 64 * 1024) // 512 * 512
                n = rng.randrange(1, 128) * 512
                data = fill(rng, n)
                w.write(off, data)
                model[off : off + n] = data
    return vdis, paths, model


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(4 * MiB), b""):
            h.update(piece)
    return h.hexdigest()


def start_agent(workdir, sr_root):
    ready = os.path.join(workdir, "agent-ready.json")
    sock = os.path.join(workdir, "agent.sock")
    log = open(os.path.join(workdir, "agent.log"), "w")
    cmd = [
        sys.executable,
        "-m",
        "agent.daemon",
        "serve",
        "--sr-root",
        sr_root,
        "--nbd-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--admin-socket",
        sock,
        "--tls",
        "off",
        "--ready-file",
        ready,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise DemoError("the agent did not start; see %s" % log.name)
        time.sleep(0.05)
    with open(ready) as f:
        return proc, json.load(f), sock


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hostsim.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="virtual disk size in MiB (default 256)")
    ap.add_argument("--workdir", help="where to build (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)

    size = args.size * MiB
    workdir = args.workdir or tempfile.mkdtemp(prefix="fastpath-demo-")
    os.makedirs(workdir, exist_ok=True)
    rng = random.Random(args.seed)
    summary = []
    agent = None
    t_start = time.monotonic()
    try:
        print("speedups: %s" % ("compiled" if speedups.COMPILED else "pure Python"))
        sr_root = os.path.join(workdir, "sr-mount")
        sr_uuid = str(uuid.uuid4())
        sr_dir = os.path.join(sr_root, sr_uuid)
        os.makedirs(sr_dir)

        step("building a 3-deep VHD chain (%d MiB virtual) in a file SR" % args.size)
        vdis, paths, model = build_chain(sr_dir, size, rng)
        model_sha = hashlib.sha256(model).hexdigest()
        with vhd.open_chain(paths[-1]) as chain:
            data_bytes = sum(e.length for e in chain.extents() if not e.zero)
            kinds = [chain.block_source(i).kind for i in range(chain.block_count)]
            files = sum(os.path.getsize(p) for p in paths)
            summary.append(("chain", "depth %d, %d MiB of VHD files" % (chain.depth, files >> 20)))
            summary.append(
                (
                    "blocks",
                    "%d allocated (%d whole in one file, %d split across levels), %d empty"
                    % (
                        len(kinds) - kinds.count("zero"),
                        kinds.count("file"),
                        kinds.count("assemble"),
                        kinds.count("zero"),
                    ),
                )
            )

            step("writing it out as raw (sparse) and as one dynamic VHD")
            raw = os.path.join(workdir, "disk.raw")
            flat = os.path.join(workdir, "disk.vhd")
            t0 = time.monotonic()
            vhd.export_raw(chain, raw)
            vhd.export_vhd(chain, flat)
            elapsed = time.monotonic() - t0
        if sha256_file(raw) != model_sha:
            raise DemoError("the raw export differs from the model")
        summary.append(
            (
                "local export",
                "raw + VHD in %.2f s (%d MiB of data each)" % (elapsed, data_bytes >> 20),
            )
        )

        step("checking with qemu-img (an oracle we did not write)")
        # qemu-img has no checker for vpc (`check` exits 63): info, compare and libvhdi judge.
        info = json.loads(run(["qemu-img", "info", "--output=json", flat]))
        if info["format"] != "vpc" or info["virtual-size"] != size:
            raise DemoError("qemu-img sees %s of %d bytes" % (info["format"], info["virtual-size"]))
        run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", flat, raw])
        run(["vhdiinfo", flat])
        summary.append(("qemu-img", "info: vpc, exact size; compare VHD vs raw: identical"))

        step("serving the chain over NBD with the agent, reading it with nbdinfo and nbdcopy")
        agent, ready, sock = start_agent(workdir, sr_root)
        out = run(
            [
                sys.executable,
                "-m",
                "agent.daemon",
                "ticket",
                "create",
                "--vdi",
                vdis[-1],
                "--admin-socket",
                sock,
                "--json",
            ]
        )
        ticket = json.loads(out)["export_name"]
        host, port = ready["nbd"]
        url = "nbd://%s:%d/%s" % (host, port, ticket)
        extents = json.loads(run(["nbdinfo", "--map", "--json", url]))
        nbd_data = sum(e["length"] for e in extents if not e["type"] & 1)
        copied = os.path.join(workdir, "nbd.raw")
        t0 = time.monotonic()
        run(["nbdcopy", url, copied])
        elapsed = time.monotonic() - t0
        if sha256_file(copied) != model_sha:
            raise DemoError("nbdcopy's copy differs from the model")
        run(["qemu-img", "compare", "-f", "raw", "-F", "vpc", copied, flat])
        summary.append(
            (
                "NBD",
                "nbdinfo --map: %d MiB allocated; nbdcopy of the %d MiB disk in %.2f s, identical to the model"
                % (nbd_data >> 20, size >> 20, elapsed),
            )
        )
    except DemoError as exc:
        print("demo failed: %s" % exc, file=sys.stderr)
        return 1
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(10)
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("xcp-fastpath demo: all checks passed in %.1f s" % (time.monotonic() - t_start))
    width = max(len(k) for k, _ in summary)
    for k, v in summary:
        print("  %s  %s" % (k.ljust(width), v))
    if args.keep or args.workdir:
        print("  files kept in %s" % workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
