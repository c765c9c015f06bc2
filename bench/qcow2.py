"""QCOW2 serving speed: the agent vs qemu-nbd on the same QCOW2 images, in one run (host side).

Data: QCOW2 images as XCP-ng 8.3's SM makes them (`<uuid>.qcow2` in a file SR directory, 64 KiB
clusters, children made with `qemu-img create -b <parent>.qcow2 -F qcow2`), written by qemu-io the
way a guest writes: runs of 64 KiB-2 MiB at cluster-aligned offsets with holes between (about 60 %
of the disk allocated), written in shuffled order, so the clusters lie in the file in another order
than on the disk (what qemu's allocation leaves after a guest's life). Bytes: pseudo-random
(incompressible; serving compresses nothing).
  flat   one image holding every run.
  chain  3 deep: a root and two children; runs spread round-robin over the levels, and 1 run in 8
         partly rewritten (4 KiB-aligned, 16-192 KiB) by a higher level, so some 2 MiB blocks are
         served from several files.

Measured, best (and median) of --repeat runs, every file warm in the page cache first:
    nbdcopy <agent flat>    null:  and  -> a file        nbdcopy <qemu-nbd -r -f qcow2 flat>  ...
    nbdcopy <agent chain>   null:  and  -> a file        nbdcopy <qemu-nbd -r -f qcow2 chain> ...
Every copy to a file is hashed: the run fails if the agent and qemu-nbd delivered other bytes.
GB/s counts the virtual disk size (holes included) per second; "data GB/s" the allocated bytes.
CPU s/GB (medians, per GB of allocated data): the server process (/proc/<pid>/stat of the agent
or of qemu-nbd) and the client (nbdcopy, getrusage of the children) — on a busy machine the
CPU columns say more than the seconds. Ratios: agent/qemu-nbd on the same image (goal >= 1.5, as
for VHD in bench/nbd_serve.py).

    .venv/bin/python -m bench.qcow2                 # 1 GiB, 3 repeats
    .venv/bin/python -m bench.qcow2 --quick         # 256 MiB, 1 repeat (smoke run)
    .venv/bin/python -m bench.qcow2 --size 64M --repeat 1 --json   # what the test runs
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.nbd_serve import Agent, QemuNbd, parse_size, timed_copy, warm  # noqa: E402

CLUSTER = 64 << 10
BS = 2 << 20
PATTERNS = 8


def plan_runs(size, seed, fraction=0.6):
    """[(offset, length)] cluster-aligned runs of 1-32 clusters with holes between, covering about
    `fraction` of the disk."""
    rng = random.Random(seed)
    clusters = size // CLUSTER
    mean_run = 16.5
    mean_gap = mean_run * (1 - fraction) / fraction
    runs = []
    c = rng.randrange(0, 4)
    while c < clusters:
        n = min(rng.randint(1, 32), clusters - c)
        runs.append((c * CLUSTER, n * CLUSTER))
        c += n + max(1, int(rng.expovariate(1 / mean_gap)))
    return runs


def make_patterns(work, seed):
    paths = []
    rng = random.Random(seed)
    for i in range(PATTERNS):
        p = os.path.join(work, "pattern%d.bin" % i)
        with open(p, "wb") as f:
            f.write(rng.randbytes(BS))
        paths.append(p)
    return paths


def qemu_io_writes(path, writes, patterns):
    """Write [(offset, length, pattern index)] into the QCOW2 image with one qemu-io process."""
    script = "".join(
        "write -q -s %s %d %d\n" % (patterns[k % len(patterns)], off, n) for off, n, k in writes
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", path],
        input=script.encode(),
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=3600,
    )


def create(path, size=None, backing=None):
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % CLUSTER]
    if backing is not None:
        cmd += ["-b", os.path.basename(backing), "-F", "qcow2"]  # SM's bare sibling name
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))
    subprocess.run(cmd, check=True, timeout=120, cwd=os.path.dirname(path))


def make_flat(sr_dir, size, runs, patterns, seed):
    vdi = str(uuid.uuid4())
    path = os.path.join(sr_dir, vdi + ".qcow2")
    create(path, size)
    writes = [(off, n, i) for i, (off, n) in enumerate(runs)]
    random.Random(seed).shuffle(writes)
    qemu_io_writes(path, writes, patterns)
    return vdi, [path]


def make_chain(sr_dir, size, runs, patterns, seed):
    """Root + 2 children; run k goes to level k % 3; 1 run in 8 is partly rewritten by a level
    above the one holding it. Returns (leaf vdi, paths root first)."""
    rng = random.Random(seed)
    levels = [[] for _ in range(3)]
    for k, (off, n) in enumerate(runs):
        level = k % 3
        levels[level].append((off, n, k))
        if k % 8 == 0 and level < 2:
            piece = rng.choice((16, 64, 128, 192)) << 10
            start = off + rng.randrange(0, max(1, (n - piece) // 4096 + 1)) * 4096
            piece = min(piece, off + n - start)
            levels[rng.randint(level + 1, 2)].append((start, piece, k + 1))
    paths = []
    for writes in levels:
        p = os.path.join(sr_dir, "%s.qcow2" % uuid.uuid4())
        if paths:
            create(p, backing=paths[-1])
        else:
            create(p, size)
        rng.shuffle(writes)
        qemu_io_writes(p, writes, patterns)
        paths.append(p)
    return os.path.basename(paths[-1])[: -len(".qcow2")], paths


def allocated_bytes(path):
    """Bytes qemu-img map says hold data (any level), the image's `data` in this bench's tables."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", path],
        capture_output=True,
        check=True,
        timeout=600,
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"])


def cpu_seconds(pid):
    """utime + stime of a process so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="virtual disk size (default 1G)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="256M, one repeat")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    args = ap.parse_args(argv)
    size = parse_size("256M" if args.quick and args.size == "1G" else args.size)
    size -= size % BS
    repeat = 1 if args.quick else max(1, args.repeat)
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit("%s is not installed" % tool)

    work = args.workdir or tempfile.mkdtemp(prefix="qcow2-bench-")
    os.makedirs(work, exist_ok=True)
    sr_root = os.path.join(work, "sr-mount")
    sr_dir = os.path.join(sr_root, str(uuid.uuid4()))
    os.makedirs(sr_dir)
    agent = None
    qemus = []
    try:
        t0 = time.time()
        patterns = make_patterns(work, args.seed)
        runs = plan_runs(size, args.seed)
        images = {}
        images["flat"] = make_flat(sr_dir, size, runs, patterns, args.seed)
        images["chain"] = make_chain(sr_dir, size, runs, patterns, args.seed)
        data = {name: allocated_bytes(paths[-1]) for name, (_v, paths) in images.items()}
        print(
            "data: %d MiB disks, 64 KiB clusters, pseudo-random bytes; flat: %d MiB allocated "
            "(%.0f %%), chain: 3 deep, %d MiB allocated (%.0f %%); prepared in %.1fs"
            % (
                size >> 20,
                data["flat"] >> 20,
                100.0 * data["flat"] / size,
                data["chain"] >> 20,
                100.0 * data["chain"] / size,
                time.time() - t0,
            )
        )
        warm([p for _v, paths in images.values() for p in paths])
        agent = Agent(work, sr_root)
        sources = []
        for name, (vdi, paths) in images.items():
            q = QemuNbd(paths[-1], fmt="qcow2")
            qemus.append(q)
            sources.append(("agent " + name, name, (lambda v=vdi: agent.uri(v)), agent.proc.pid))
            sources.append(("qemu-nbd " + name, name, (lambda u=q.uri: u), q.proc.pid))
        samples = {}
        cpu = {}
        digests = {}
        for _ in range(repeat):
            for label, image, uri_fn, pid in sources:
                for dest in ("null:", os.path.join(work, "out.raw")):
                    kind = "null" if dest == "null:" else "file"
                    uri = uri_fn()
                    s0, c0 = cpu_seconds(pid), children_cpu()
                    t, digest = timed_copy(uri, dest, args.connections)
                    s1, c1 = cpu_seconds(pid), children_cpu()
                    if digest is not None:
                        digests.setdefault(image, set()).add(digest)
                    samples.setdefault((label, kind), []).append(t)
                    gb = data[image] / 1e9
                    cpu.setdefault((label, kind), []).append(((s1 - s0) / gb, (c1 - c0) / gb))
        best = {k: min(v) for k, v in samples.items()}
        print()
        print(
            "%-15s %-5s %9s %9s %9s %10s %12s %12s"
            % (
                "server",
                "dest",
                "best s",
                "median s",
                "GB/s",
                "data GB/s",
                "server s/GB",
                "client s/GB",
            )
        )
        for label, image, _, _pid in sources:
            for kind in ("null", "file"):
                t = best[(label, kind)]
                c = cpu[(label, kind)]
                print(
                    "%-15s %-5s %9.3f %9.3f %9.2f %10.2f %12.2f %12.2f"
                    % (
                        label,
                        kind,
                        t,
                        statistics.median(samples[(label, kind)]),
                        size / t / 1e9,
                        data[image] / t / 1e9,
                        statistics.median(x[0] for x in c),
                        statistics.median(x[1] for x in c),
                    )
                )
        print()
        ratios = {}
        for image in images:
            for kind in ("null", "file"):
                r = best[("qemu-nbd " + image, kind)] / best[("agent " + image, kind)]
                ratios["%s %s" % (image, kind)] = r
                print("%-5s to %-4s  agent/qemu-nbd = %.2fx (goal >= 1.5)" % (image, kind, r))
        bad = {k: sorted(v) for k, v in digests.items() if len(v) != 1}
        if bad:
            raise SystemExit("the servers delivered different bytes: %s" % bad)
        print(
            "(best of %d, nbdcopy --connections=%d, page cache warm; for each image every copy "
            "had the same SHA-256)" % (repeat, args.connections)
        )
        if args.json:
            print(
                json.dumps(
                    {
                        "size": size,
                        "repeat": repeat,
                        "connections": args.connections,
                        "allocated": data,
                        "seconds": {"%s %s" % k: v for k, v in sorted(samples.items())},
                        "cpu_per_gb": {
                            "%s %s" % k: {"server": [x[0] for x in v], "client": [x[1] for x in v]}
                            for k, v in sorted(cpu.items())
                        },
                        "ratios": ratios,
                        "sha256": {k: sorted(v)[0] for k, v in digests.items()},
                    },
                    sort_keys=True,
                )
            )
    finally:
        if agent is not None:
            agent.stop()
        for q in qemus:
            q.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
