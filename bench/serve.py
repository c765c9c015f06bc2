"""``fastpath serve`` vs ``fastpath restore -o -``: first-byte latency and sequential throughput.

One run, one restore point (``--size``, default 4 GiB, written into a fresh repository with
the repository's own writer): per 2 MiB chunk, ~10 % all-zero chunks (holes), ~15 % random, the
rest 64 KiB pieces of stdlib ``.py`` text, random bytes or zeros (the data of
bench/repo_ingest.py). Measured, each as a subprocess like a user runs it:

- restore: ``fastpath restore REPO ID -o -`` read by this script and discarded: first byte (from
  the process start: Python start, repository open, index read, first chunk) and the whole disk.
- serve, cold: ``fastpath serve`` started, then a libnbd client reads 4 KiB at offset 0 (first
  byte = from the server's start to that read's end).
- serve, warm: the server already up, a fresh libnbd client connects and reads 4 KiB at offset
  0 of a chunk nobody read yet (connect + fetch + decode).
- serve, sequential: ``nbdcopy URI null:`` (multi-conn, holes skipped from block status) and
  ``nbdcopy --connections=1`` with ``--cache-mib`` and ``--prefetch`` as given.

Ratios are printed against restore measured in the same run. Run:
``.venv/bin/python -m bench.serve [--size 4G] [--encrypted] [--s3] [--json]`` (``--size 256M``
for a smoke run). The page cache holds the repository after the first pass: both sides read it
warm (the restore runs first, and once more at the end to show it was not slower then).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from bench.repo_ingest import PIECE, text_corpus
from orchestrator.repo.codec import CHUNK_SIZE
from orchestrator.repo.repository import Repository

VM = "bench-serve-vm"
VDI = "5e1f0000-0000-4000-8000-000000000001"
PASSPHRASE = "bench serve passphrase"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("IB")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def chunk(i: int, corpus: bytes) -> bytes | None:
    rng = random.Random(i * 7919 + 1)
    kind = rng.random()
    if kind < 0.10:
        return None
    if kind < 0.25:
        return rng.randbytes(CHUNK_SIZE)
    parts = []
    for _ in range(CHUNK_SIZE // PIECE):
        r = rng.random()
        if r < 0.5:
            start = rng.randrange(0, len(corpus) - PIECE)
            parts.append(corpus[start : start + PIECE])
        elif r < 0.75:
            parts.append(rng.randbytes(PIECE))
        else:
            parts.append(bytes(PIECE))
    return b"".join(parts)


def make_point(url: str, size: int, encrypted: bool) -> str:
    corpus = text_corpus()
    repo = Repository.init(url, encrypt=encrypted, passphrase=PASSPHRASE if encrypted else None)
    try:
        with repo.begin_backup(VM) as session:
            w = session.disk_writer(VDI, VDI, size)
            for i in range(size // CHUNK_SIZE):
                data = chunk(i, corpus)
                if data is not None:
                    w.put_chunk(i, data)
            w.commit()
            return session.commit({"bench": "serve"})
    finally:
        repo.close()


def env_for(encrypted: bool) -> dict[str, str]:
    env = dict(os.environ)
    if encrypted:
        env["FASTPATH_PASSPHRASE"] = PASSPHRASE
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def time_restore(url: str, rid: str, env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(
        cli("restore", url, rid, "-o", "-", "--progress", "quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    first = None
    total = 0
    while True:
        data = proc.stdout.read1(4 << 20)
        if not data:
            break
        if first is None:
            first = time.perf_counter() - start
        total += len(data)
    proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"restore failed ({proc.returncode})")
    return {
        "first_byte_s": first,
        "seconds": seconds,
        "bytes": total,
        "MBps": total / seconds / 1e6,
    }


class Server:
    def __init__(self, url, rid, env, extra=()):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            cli(
                "serve",
                url,
                rid,
                "--listen",
                "127.0.0.1:0",
                "--json",
                "--progress",
                "quiet",
                *extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        line = []
        t = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(120)
        self.ready = json.loads(line[0])
        self.ready_s = time.perf_counter() - self.start
        self.uri = self.ready["uri"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def first_read(uri: str, offset: int) -> float:
    import nbd

    start = time.perf_counter()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, offset)
    elapsed = time.perf_counter() - start
    h.shutdown()
    return elapsed


def nbdcopy(uri: str, connections: int | None) -> float:
    cmd = ["nbdcopy", uri, "null:"]
    if connections:
        cmd.insert(1, f"--connections={connections}")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=3600)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--encrypted", action="store_true")
    ap.add_argument("--s3", action="store_true", help="repository on a moto S3 server")
    ap.add_argument("--cache-mib", default="256")
    ap.add_argument("--prefetch", default="8")
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    size = parse_size(args.size) // CHUNK_SIZE * CHUNK_SIZE
    work = args.dir or tempfile.mkdtemp(prefix="bench-serve-")
    moto = None
    try:
        if args.s3:
            from pathlib import Path

            from tests.fixtures.s3 import CREDENTIALS, REGION, start_moto

            moto = start_moto(Path(work) / "moto.log")
            bucket = "bench-serve"
            moto.client().create_bucket(Bucket=bucket)
            os.environ.update(CREDENTIALS)
            os.environ.update({"AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL_S3": moto.url})
            url = f"s3://{bucket}/repo"
        else:
            url = os.path.join(work, "repo")
        t0 = time.perf_counter()
        rid = make_point(url, size, args.encrypted)
        made = time.perf_counter() - t0
        env = env_for(args.encrypted)
        restore = time_restore(url, rid, env)
        extra = ("--cache-mib", args.cache_mib, "--prefetch", args.prefetch)
        srv = Server(url, rid, env, extra)
        try:
            cold = srv.ready_s + first_read(srv.uri, 0)
            warm = first_read(srv.uri, size // 2 + 4096 * 3)
            multi = nbdcopy(srv.uri, None)
        finally:
            srv.stop()
        srv = Server(url, rid, env, extra)
        try:
            single = nbdcopy(srv.uri, 1)
        finally:
            srv.stop()
        restore2 = time_restore(url, rid, env)
        rate = restore["MBps"]
        result = {
            "size": size,
            "repo": "s3 (moto)" if args.s3 else "local",
            "encrypted": args.encrypted,
            "point_written_s": round(made, 2),
            "restore": restore,
            "restore_again": restore2,
            "serve_cold_first_byte_s": cold,
            "serve_warm_first_byte_s": warm,
            "serve_nbdcopy_s": multi,
            "serve_nbdcopy_MBps": size / multi / 1e6,
            "serve_nbdcopy_1conn_s": single,
            "serve_nbdcopy_1conn_MBps": size / single / 1e6,
        }
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print(f"{size >> 20} MiB point, {result['repo']}, encrypted={args.encrypted}")
            print(
                f"  restore -o -   first byte {restore['first_byte_s']:.3f}s, "
                f"{restore['MBps']:.0f} MB/s (again at the end: {restore2['MBps']:.0f} MB/s)"
            )
            print(
                f"  serve cold     first byte {cold:.3f}s "
                f"({cold / restore['first_byte_s']:.2f}x restore's)"
            )
            print(
                f"  serve warm     first byte {warm:.3f}s "
                f"({warm / restore['first_byte_s']:.2f}x restore's)"
            )
            print(
                f"  serve nbdcopy  {result['serve_nbdcopy_MBps']:.0f} MB/s "
                f"({result['serve_nbdcopy_MBps'] / rate:.2f}x restore)"
            )
            print(
                f"  serve 1 conn   {result['serve_nbdcopy_1conn_MBps']:.0f} MB/s "
                f"({result['serve_nbdcopy_1conn_MBps'] / rate:.2f}x restore)"
            )
    finally:
        if moto is not None:
            from tests.fixtures.s3 import stop_process

            stop_process(moto.proc)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
