"""NBD serving speed: the agent vs qemu-nbd on the same VHD, in one run (host-side question).

Data: a dynamic VHD of --size bytes (default 4 GiB) with every other 2 MiB block allocated and filled
with pseudo-random bytes (incompressible; compression plays no part in serving), made by
`qemu-img convert -O vpc` from a sparse raw image, so qemu-nbd reads it natively. The same data is
also written by our VHD writer as a 3-deep chain (root + two differencing disks, allocated blocks
spread round-robin over the levels, each block whole in one file).

Measured, best of --repeat runs, every file warm in the page cache first:
    nbdcopy <agent  flat VHD>   null:   and   -> a file
    nbdcopy <qemu-nbd flat VHD> null:   and   -> a file
    nbdcopy <agent  3-deep chain> null: and   -> a file
    nbdcopy <agent  3-deep chain, 1 block in 4 split over two files> (assembly instead of sendfile)
GB/s counts the virtual disk size (holes included) per second; "data GB/s" counts allocated bytes.
Ratios: agent/qemu-nbd (goal >= 1.5) and chain/flat for the agent (goal >= 1/1.2).

    .venv/bin/python -m bench.nbd_serve                 # 4 GiB, 3 repeats
    .venv/bin/python -m bench.nbd_serve --quick         # 512 MiB, 1 repeat (smoke run)
    .venv/bin/python -m bench.nbd_serve --size 8G --repeat 5 --connections 4
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agent import vhd  # noqa: E402
from agent.tickets import admin_call  # noqa: E402

BS = 2 * 1024 * 1024


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def block_data(i):
    return random.Random(i).randbytes(BS)


def make_data(work, size):
    """Sparse raw image with every other block filled; returns (raw path, allocated block list)."""
    raw = os.path.join(work, "source.raw")
    blocks = list(range(0, size // BS, 2))
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in blocks:
            f.seek(i * BS)
            f.write(block_data(i))
    return raw, blocks


def make_flat(raw, sr_dir):
    vdi = str(uuid.uuid4())
    path = os.path.join(sr_dir, vdi + ".vhd")
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            raw,
            path,
        ],
        check=True,
        timeout=3600,
    )
    return vdi, path


def make_chain(size, blocks, sr_dir, split_every=0):
    """Root + 2 differencing levels; block k of `blocks` goes to level k % 3 (each block whole).
    With split_every=n, every n-th block is also rewritten half by the leaf (same bytes), so the
    agent must assemble it from two files instead of sending it with sendfile."""
    vdis = [str(uuid.uuid4()) for _ in range(3)]
    paths = [os.path.join(sr_dir, v + ".vhd") for v in vdis]
    for level in range(3):
        if level == 0:
            w = vhd.create_dynamic(paths[0], size)
        else:
            w = vhd.create_differencing(paths[level], paths[level - 1])
        with w:
            for k, i in enumerate(blocks):
                if k % 3 == level:
                    w.write(i * BS, block_data(i))
                elif level == 2 and split_every and k % split_every == 0:
                    w.write(i * BS + BS // 2, block_data(i)[BS // 2 :])
    return vdis[-1], paths


def warm(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(8 << 20):
                pass


class Agent(object):
    def __init__(self, work, sr_root):
        self.sock = os.path.join(work, "agent.sock")
        self.ready = os.path.join(work, "agent-ready.json")
        self.log = open(os.path.join(work, "agent.log"), "wb")
        self.proc = subprocess.Popen(
            [
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
                self.sock,
                "--tls",
                "off",
                "--ready-file",
                self.ready,
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise SystemExit("agent did not start (see %s)" % self.log.name)
            time.sleep(0.05)
        with open(self.ready) as f:
            self.host, self.port = json.load(f)["nbd"]

    def uri(self, vdi):
        resp = admin_call(self.sock, {"op": "create_ticket", "vdi": vdi, "ttl": 7200})
        if not resp.get("ok"):
            raise SystemExit("ticket: %s" % resp)
        return "nbd://%s:%d/%s" % (self.host, self.port, resp["export_name"])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class QemuNbd(object):
    def __init__(self, path, fmt="vpc"):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "qemu-nbd",
                "-r",
                "-f",
                fmt,
                "-t",
                "--shared=16",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-x",
                "disk",
                path,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("qemu-nbd did not start") from None
                time.sleep(0.05)
        self.uri = "nbd://127.0.0.1:%d/disk" % self.port

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def timed_copy(uri, dest, connections):
    """Seconds for one nbdcopy, and the SHA-256 of what landed in `dest` (None for null:)."""
    cmd = ["nbdcopy", "--connections=%d" % connections, uri, dest]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=3600)
    elapsed = time.perf_counter() - t0
    digest = None
    if dest != "null:":
        h = hashlib.sha256()
        with open(dest, "rb") as f:
            for piece in iter(lambda: f.read(8 << 20), b""):
                h.update(piece)
        digest = h.hexdigest()
        os.unlink(dest)
    return elapsed, digest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="4G", help="virtual disk size (default 4G)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="512M, one repeat")
    ap.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    args = ap.parse_args(argv)
    size = parse_size("512M" if args.quick and args.size == "4G" else args.size)
    size -= size % BS
    repeat = 1 if args.quick else args.repeat
    for tool in ("qemu-img", "qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit("%s is not installed" % tool)

    work = args.workdir or tempfile.mkdtemp(prefix="nbd-serve-bench-")
    os.makedirs(work, exist_ok=True)
    sr_root = os.path.join(work, "sr-mount")
    sr_dir = os.path.join(sr_root, str(uuid.uuid4()))
    os.makedirs(sr_dir)
    agent = qemu = None
    try:
        t0 = time.time()
        raw, blocks = make_data(work, size)
        flat_vdi, flat_path = make_flat(raw, sr_dir)
        os.unlink(raw)
        chain_vdi, chain_paths = make_chain(size, blocks, sr_dir)
        split_dir = os.path.join(sr_root, str(uuid.uuid4()))
        os.makedirs(split_dir)
        split_vdi, split_paths = make_chain(size, blocks, split_dir, split_every=4)
        data_bytes = len(blocks) * BS
        print(
            "data: %d MiB disk, %d of %d blocks allocated (pseudo-random bytes), prepared in %.1fs"
            % (size >> 20, len(blocks), size // BS, time.time() - t0)
        )
        warm([flat_path] + chain_paths + split_paths)
        agent = Agent(work, sr_root)
        qemu = QemuNbd(flat_path)
        sources = [
            ("agent flat", lambda: agent.uri(flat_vdi)),
            ("qemu-nbd flat", lambda: qemu.uri),
            ("agent 3-chain", lambda: agent.uri(chain_vdi)),
            ("agent split", lambda: agent.uri(split_vdi)),
        ]
        best = {}
        digests = set()
        for _ in range(repeat):
            for name, uri_fn in sources:
                for dest in ("null:", os.path.join(work, "out.raw")):
                    kind = "null" if dest == "null:" else "file"
                    t, digest = timed_copy(uri_fn(), dest, args.connections)
                    if digest is not None:
                        digests.add(digest)
                    key = (name, kind)
                    best[key] = min(best.get(key, t), t)
        print()
        print("%-15s %-5s %9s %9s %12s" % ("server", "dest", "seconds", "GB/s", "data GB/s"))
        for name, _ in sources:
            for kind in ("null", "file"):
                t = best[(name, kind)]
                print(
                    "%-15s %-5s %9.3f %9.2f %12.2f"
                    % (name, kind, t, size / t / 1e9, data_bytes / t / 1e9)
                )
        print()
        for kind in ("null", "file"):
            ratio = best[("qemu-nbd flat", kind)] / best[("agent flat", kind)]
            chain = best[("agent flat", kind)] / best[("agent 3-chain", kind)]
            print(
                "to %-4s  agent/qemu-nbd = %.2fx (goal >= 1.5)   agent chain/flat = %.2fx (goal >= %.2f)"
                % (kind, ratio, chain, 1 / 1.2)
            )
        if len(digests) != 1:
            raise SystemExit("the servers delivered different bytes: %s" % sorted(digests))
        print(
            "(best of %d, nbdcopy --connections=%d, page cache warm; every copy had the same "
            "SHA-256; 'agent split' = the 3-chain with 1 allocated block in 4 split over two "
            "files, assembled in memory)" % (repeat, args.connections)
        )
    finally:
        if agent is not None:
            agent.stop()
        if qemu is not None:
            qemu.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
