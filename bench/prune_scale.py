"""Prune + GC at scale on S3: 100 VMs x 30 restore points (moto server), time and S3 calls.

What it does, in one run:
1. starts a moto S3 server (subprocess on loopback) and a pass-through proxy (the tests' fault
   proxy with 0 % faults) that counts HTTP requests by method;
2. fills a repository through the real writer: a 16 MiB template disk (8 chunks of 2 MiB,
   half text, half random) shared by every VM (first backup of each VM is an incremental on the
   template's index, so the template is stored once), then ``--points`` restore points per VM,
   each changing the disk's 4 KiB tail chunk (unique per point) — a metadata-heavy repository,
   which is what prune and GC costs depend on;
3. measures ``prune`` (``--keep-last 7 --keep-daily 7 --keep-weekly 4``: here the 7 newest per
   VM survive, the 23 others go) then ``gc``, with S3 calls counted by verb at the backend
   boundary and by HTTP method at the proxy (any copy would show as a PUT with
   x-amz-copy-source: counted too);
4. measures the dedup lookup's RAM per TB (524288 random digests = 1 TiB of 2 MiB chunks).

Goal: prune + GC < 60 s, zero copy calls, zero chunk writes. Baseline printed for context: the
time to list every object of the repository once (the floor of any mark-and-sweep).

Run: ``.venv/bin/python -m bench.prune_scale`` (100 x 30) or ``--quick`` (10 x 10).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.benchcmd.fleet import lookup_ram_per_tb
from orchestrator.jobs.gc import run_gc
from orchestrator.jobs.prune import RetentionPolicy, run_prune
from orchestrator.repo.backends import open_backend
from orchestrator.repo.codec import CHUNK_SIZE
from orchestrator.repo.repository import Repository

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fixtures.s3 import CREDENTIALS, REGION, FaultProxy, start_moto, stop_process  # noqa: E402
from tests.repo_ops.helpers import CountingBackend, chunk_bytes  # noqa: E402

TEMPLATE_CHUNKS = 8
TAIL = 4096


def populate(repo: Repository, vms: int, points: int, threads: int) -> dict[str, float]:
    size = TEMPLATE_CHUNKS * CHUNK_SIZE + TAIL
    tmpl_vm = str(uuid.UUID(int=0xFFFF))
    with repo.begin_backup(tmpl_vm, use_lookup=False) as s:
        w = s.disk_writer(tmpl_vm, tmpl_vm, size)
        for i in range(TEMPLATE_CHUNKS):
            w.put_chunk(i, chunk_bytes(i))
        w.put_chunk(TEMPLATE_CHUNKS, bytes(TAIL))
        template = w.commit()
        s.commit({"template": True})

    def one_vm(n: int) -> None:
        vm = str(uuid.UUID(int=n + 1))
        vdi = str(uuid.UUID(int=0x10000 + n))
        base = template
        for gen in range(points):
            with repo.begin_backup(vm, use_lookup=False) as s:
                w = s.disk_writer(vdi, vdi, size, base=base, concurrency=2)
                w.put_chunk(TEMPLATE_CHUNKS, chunk_bytes(n * 100_000 + gen, TAIL))
                base = w.commit()
                s.commit({"gen": gen})

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one_vm, range(vms)))
    return {"populate_s": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--points", type=int, default=30)
    ap.add_argument("--threads", type=int, default=8, help="populating threads")
    ap.add_argument("--quick", action="store_true", help="10 VMs x 10 restore points")
    args = ap.parse_args(argv)
    if args.quick:
        args.vms, args.points = 10, 10
    os.environ.setdefault("FASTPATH_INSECURE_TEST_KDF_N", "1024")
    tmp = Path(tempfile.mkdtemp(prefix="prune-scale-"))
    moto = start_moto(tmp / "moto.log")
    proxy = FaultProxy(moto.url, seed=0)  # 0 % faults: a counting pass-through
    try:
        for name, value in CREDENTIALS.items():
            os.environ[name] = value
        os.environ["AWS_DEFAULT_REGION"] = REGION
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        moto.client().create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/repo"
        backend = CountingBackend(open_backend(url, endpoint_url=proxy.url, concurrency=32))
        repo = Repository.init(backend)
        print(f"populating {args.vms} VMs x {args.points} restore points on moto ...", flush=True)
        stats = populate(repo, args.vms, args.points, args.threads)
        print(f"  populated in {stats['populate_s']:.1f} s", flush=True)
        time.sleep(1.1)  # S3 LastModified has 1 s resolution: let the populate's second pass

        t0 = time.monotonic()
        listed = sum(1 for _ in backend.list(""))
        list_s = time.monotonic() - t0

        def measure(label, fn):
            backend.reset()
            start = len(proxy.log)
            t = time.monotonic()
            result = fn()
            elapsed = time.monotonic() - t
            http = Counter(m for m, _p, _k in proxy.log[start:])
            verbs = Counter()
            for (verb, _family), n in backend.calls.items():
                verbs[verb] += n
            chunk_writes = backend.count("put", "chunks") + backend.count("put_if_absent", "chunks")
            print(
                f"{label:6s} {elapsed:7.2f} s  backend calls {dict(sorted(verbs.items()))}  "
                f"HTTP {dict(sorted(http.items()))}  copies {backend.count('copy')}  "
                f"chunk writes {chunk_writes}",
                flush=True,
            )
            return result, elapsed, verbs, http

        policy = RetentionPolicy(keep_last=7, keep_daily=7, keep_weekly=4)
        pr, prune_s, _, _ = measure("prune", lambda: run_prune(repo, policy))
        gc, gc_s, _, _ = measure("gc", lambda: run_gc(repo, margin=0))
        ram = lookup_ram_per_tb()
        total = prune_s + gc_s
        print()
        print(f"objects in repository before prune: {listed} (one full listing: {list_s:.2f} s)")
        print(
            f"prune: {len(pr['deleted'])} restore points deleted, {pr['objects_deleted']} objects"
        )
        print(
            f"gc: {gc['indexes']} indexes read, {gc['chunks_total']} chunks listed, "
            f"{gc['chunks_deleted']} deleted"
        )
        print(
            f"prune + gc: {total:.2f} s (goal < 60 s) = {total / list_s:.1f}x one full listing; "
            f"copy calls: {backend.count('copy')} (goal 0)"
        )
        print(
            f"dedup lookup RAM per TB: array {ram['array_mb_per_tb']:.2f} MB, retained "
            f"{ram['retained_mb_per_tb']:.2f} MB, peak while building "
            f"{ram['build_peak_mb_per_tb']:.2f} MB (goal <= 10 MB retained); repo cache "
            f"{gc['dedup_lookup_bytes']} bytes for {gc['chunks_referenced']} chunks"
        )
        repo.close()
        ok = total < 60 and backend.count("copy") == 0
        return 0 if ok else 1
    finally:
        proxy.close()
        stop_process(moto.proc)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
