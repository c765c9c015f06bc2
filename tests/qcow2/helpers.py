"""Helpers of the QCOW2 tests: images and chains made by qemu-img / qemu-io (the oracles), and
what qemu says they read as (`qemu-img convert -O raw`, `qemu-img map --output=json`)."""

import json
import os
import subprocess
import uuid as uuidlib

from tests.fixtures.vhd import pattern

KiB = 1 << 10
MiB = 1 << 20
TIMEOUT = 120


def run(cmd, timeout=TIMEOUT, check=True, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


def create(path, size=None, cluster=None, compat=None, backing=None, backing_fmt="qcow2", opts=()):
    """qemu-img create -f qcow2 [-o cluster_size=..,compat=..] [-b backing -F fmt] path [size]."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    o = []
    if cluster:
        o.append("cluster_size=%d" % cluster)
    if compat:
        o.append("compat=%s" % compat)
    o.extend(opts)
    if o:
        cmd += ["-o", ",".join(o)]
    if backing is not None:
        cmd += ["-b", str(backing)]
        if backing_fmt:
            cmd += ["-F", backing_fmt]
    cmd.append(str(path))
    if size is not None:
        cmd.append(str(size))
    run(cmd)
    return str(path)


def io(path, *commands, fmt="qcow2"):
    """qemu-io -f fmt -c cmd ... path (writes go to the image; its backing chain is opened)."""
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(path))
    run(cmd)


def write(path, offset, data, fmt="qcow2"):
    """Write exactly `data` at offset through qemu-io (write -s <file with those bytes>)."""
    src = "%s.%s.src" % (path, uuidlib.uuid4().hex[:6])
    with open(src, "wb") as f:
        f.write(data)
    try:
        io(path, "write -s %s %d %d" % (src, offset, len(data)), fmt=fmt)
    finally:
        os.unlink(src)


def write_random(path, offset, length, seed):
    data = pattern(seed, length)
    write(path, offset, data)
    return data


def qemu_raw(path, fmt="qcow2"):
    """The disk as qemu-img decodes it (with its backing chain)."""
    out = "%s.%s.raw" % (path, uuidlib.uuid4().hex[:6])
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), out])
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def qemu_map(path):
    return json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout)


def merged_zero_runs(runs):
    """[(offset, length, zero)] with adjacent runs of equal `zero` merged."""
    out = []
    for off, n, z in runs:
        if n <= 0:
            continue
        if out and out[-1][2] == z and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, z)
        else:
            out.append((off, n, z))
    return out


def qemu_zero_runs(path):
    """qemu-img map as (offset, length, zero) runs, zero meaning "no data" ("data": false: zero
    clusters, unallocated everywhere, past a smaller backing file)."""
    return merged_zero_runs([(e["start"], e["length"], not e["data"]) for e in qemu_map(path)])


def our_zero_runs(chain):
    return merged_zero_runs([(e.offset, e.length, e.zero) for e in chain.extents()])


def qemu_blocks_above(path, depth, block=2 * MiB):
    """Blocks qemu-img map places (present) in the top `depth` files of the chain: the oracle
    for changed blocks relative to the file at that depth."""
    blocks = set()
    for e in qemu_map(path):
        if e["depth"] < depth and e["present"]:
            blocks.update(range(e["start"] // block, (e["start"] + e["length"] - 1) // block + 1))
    return sorted(blocks)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_be(path, offset, size):
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(size), "big")


def sm_chain(directory, size, depth, cluster=None, compat=None, writes_per_level=3, seed=0):
    """A chain as SM's FileSR makes it: files <uuid>.qcow2 in one directory, each child's backing
    name the bare parent file name (`qemu-img create -b <uuid>.qcow2 -F qcow2`, run in the SR
    directory). Random writes at a few offsets per level. Returns the paths, root first."""
    import random

    rnd = random.Random(seed)
    paths = []
    for i in range(depth):
        p = os.path.join(str(directory), "%s.qcow2" % uuidlib.uuid4())
        if paths:
            create(p, cluster=cluster, compat=compat, backing=os.path.basename(paths[-1]))
        else:
            create(p, size, cluster=cluster, compat=compat)
        for w in range(writes_per_level):
            off = rnd.randrange(0, size // (64 * KiB)) * 64 * KiB + rnd.choice((0, 512, 4096))
            n = min(rnd.choice((4 * KiB, 64 * KiB, 300 * KiB, 2 * MiB)), size - off)
            write_random(p, off, n, seed * 1000 + i * 10 + w)
        paths.append(p)
    return paths
