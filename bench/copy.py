"""``fastpath copy`` of a many-VM repository vs a plain object copy of the same bytes, one run.

Builds SRC through the real writer: ``--vms`` VMs x ``--points`` restore points, each disk
``--chunks`` 2 MiB chunks (half text-like, half random), one chunk changed per point (incremental
on the previous index). Then, into fresh local repositories:

  copy        ``copy_repository(SRC, DST)`` (every point, every chunk verified on the way)
  copy again  the same once more: nothing to send (the incremental case)
  plain copy  every object of SRC read and written as a plain object (``get`` + ``put`` each,
              the same backend layer), i.e. what an object-store copy of the bytes costs

Requests are counted at the backend (SRC + DST calls). Ratios are against the plain copy of the
same run. Run: ``.venv/bin/python -m bench.copy`` (10 x 30, 4 chunks) or ``--quick`` (3 x 5).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import tempfile
import time
import uuid

from orchestrator.jobs.copy import copy_repository
from orchestrator.repo.backends import open_backend
from orchestrator.repo.backends.base import Backend
from orchestrator.repo.codec import CHUNK_SIZE
from orchestrator.repo.repository import Repository


class Counted(Backend):
    """Counts backend calls (the requests an S3 backend would make)."""

    def __init__(self, inner: Backend, counter: collections.Counter):
        self.inner, self.url, self.counter = inner, inner.url, counter

    def _c(self, verb):
        self.counter[verb] += 1

    def get(self, key):
        self._c("get")
        return self.inner.get(key)

    def put(self, key, data):
        self._c("put")
        self.inner.put(key, data)

    def put_if_absent(self, key, data):
        self._c("put")
        return self.inner.put_if_absent(key, data)

    def exists(self, key):
        self._c("head")
        return self.inner.exists(key)

    def stat(self, key):
        self._c("head")
        return self.inner.stat(key)

    def list(self, prefix=""):
        self._c("list")
        return self.inner.list(prefix)

    def delete(self, key):
        self._c("delete")
        self.inner.delete(key)

    def close(self):
        self.inner.close()


def chunk(seed: int) -> bytes:
    rng = random.Random(seed)
    half = CHUNK_SIZE // 2
    word = b"copy bench %d " % seed
    return (word * (half // len(word) + 1))[:half] + rng.randbytes(CHUNK_SIZE - half)


def build(path, vms: int, points: int, chunks: int) -> Repository:
    repo = Repository.init(path)
    for v in range(vms):
        vm = str(uuid.UUID(int=v + 1))
        vdi = str(uuid.UUID(int=1000 + v))
        data = [chunk(v * 100_000 + i) for i in range(chunks)]
        base = None
        for p in range(points):
            with repo.begin_backup(vm) as s:
                w = s.disk_writer(vdi, vdi, chunks * CHUNK_SIZE, base=base)
                if base is None:
                    todo = range(chunks)
                else:
                    i = p % chunks
                    data[i] = chunk(v * 100_000 + 1000 + p)
                    todo = [i]
                for i in todo:
                    w.put_chunk(i, data[i])
                base = w.commit()
                s.commit({"bench": True})
    return repo


def run(vms: int, points: int, chunks: int) -> dict:
    root = tempfile.mkdtemp(prefix="bench-copy-")
    try:
        t0 = time.monotonic()
        build(f"{root}/src", vms, points, chunks).close()
        built = time.monotonic() - t0
        out = {"vms": vms, "points": points, "chunks_per_disk": chunks, "build_s": round(built, 2)}
        n_src = collections.Counter()
        src = Repository.open(Counted(open_backend(f"{root}/src"), n_src))
        objects = list(src.backend.inner.list(""))
        out["objects"] = len(objects)
        out["bytes"] = sum(o.size for o in objects)
        for label in ("copy", "copy again"):
            n_src.clear()
            n_dst = collections.Counter()
            if label == "copy":
                Repository.init(f"{root}/dst").close()
            dst = Repository.open(Counted(open_backend(f"{root}/dst"), n_dst))
            t0 = time.monotonic()
            r = copy_repository(src, dst)
            out[label] = {
                "seconds": round(time.monotonic() - t0, 3),
                "requests": sum(n_src.values()) + sum(n_dst.values()),
                "points_copied": r["points_copied"],
                "chunks_sent": r["chunks_sent"],
                "bytes_sent": r["bytes_sent"],
            }
            dst.close()
        n = collections.Counter()
        a = Counted(open_backend(f"{root}/src"), n)
        b = Counted(open_backend(f"{root}/plain", create=True), n)
        t0 = time.monotonic()
        for o in a.list(""):
            b.put(o.key, a.get(o.key))
        out["plain copy"] = {
            "seconds": round(time.monotonic() - t0, 3),
            "requests": sum(n.values()),
        }
        base = out["plain copy"]
        for label in ("copy", "copy again"):
            out[label]["time_ratio"] = round(out[label]["seconds"] / base["seconds"], 3)
            out[label]["request_ratio"] = round(out[label]["requests"] / base["requests"], 3)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--points", type=int, default=30)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.vms, args.points, args.chunks = 3, 5, 2
    r = run(args.vms, args.points, args.chunks)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{r['vms']} VMs x {r['points']} points, {r['objects']} objects, {r['bytes']} bytes")
    for label in ("plain copy", "copy", "copy again"):
        x = r[label]
        extra = (
            f"  ({x['time_ratio']}x time, {x['request_ratio']}x requests)"
            if "time_ratio" in x
            else ""
        )
        print(f"{label:11s} {x['seconds']:8.3f} s {x['requests']:7d} requests{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
