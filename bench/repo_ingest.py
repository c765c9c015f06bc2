"""Repository ingest: chunk codec throughput per stage vs the raw copy of the same bytes, one run.

Data: ``--chunks`` 2 MiB chunks that look like a disk (per 64 KiB piece: Python sources as text,
random bytes or zeros; plus ~10 % all-zero chunks, never stored, and ~15 % fully random chunks,
which zstd cannot shrink). Stages, each over every chunk, GB/s of logical (input) bytes:

  digest            BLAKE3 (1 thread per call, and max_threads=AUTO)
  digest keyed      keyed BLAKE3, as in an encrypted repository
  zstd              level 1, kept only when smaller (ChunkCodec.encode, unencrypted)
  aes-gcm           AES-256-GCM of the (compressed) payload alone
  encode enc        zstd + AES-GCM (ChunkCodec.encode, encrypted)
  local put         LocalBackend.put of the encoded objects (temp file, fsync, rename, fsync dir)
  local ingest      the whole path per chunk (zero check, digest, encode, put), with --threads
  S3 ingest         the same into an S3Backend on a moto server (subprocess on loopback)

Baselines measured in the same run: ``raw copy+fsync`` = the same bytes written into one file
with 2 MiB writes then fdatasync (copying the disk file); ``raw S3 put`` = the same 2 MiB chunks
PUT as plain objects with boto3 at the same concurrency.

Run: ``.venv/bin/python -m bench.repo_ingest`` (512 MiB) or ``--quick`` (64 MiB); ``--json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from orchestrator.repo.backends.local import LocalBackend
from orchestrator.repo.codec import CHUNK_SIZE, ZERO_DIGEST, ChunkCodec, chunk_key

PIECE = 64 * 1024


def text_corpus(limit: int = 16 << 20) -> bytes:
    out = bytearray()
    pattern = os.path.join(os.path.dirname(os.__file__), "**", "*.py")
    for path in sorted(glob.glob(pattern, recursive=True)):
        try:
            with open(path, "rb") as f:
                out += f.read()
        except OSError:
            continue
        if len(out) >= limit:
            break
    return bytes(out)


def make_chunks(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    corpus = text_corpus()
    chunks = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.10:
            chunks.append(bytes(CHUNK_SIZE))
        elif kind < 0.25:
            chunks.append(rng.randbytes(CHUNK_SIZE))
        else:
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
            chunks.append(b"".join(parts))
    return chunks


def timed(fn, items, threads: int = 1) -> tuple[float, list]:
    t0 = time.perf_counter()
    if threads <= 1:
        out = [fn(x) for x in items]
    else:
        with ThreadPoolExecutor(threads) as pool:
            out = list(pool.map(fn, items))
    return time.perf_counter() - t0, out


def config(encrypted: bool):
    return SimpleNamespace(chunk_size=CHUNK_SIZE, compression="zstd:1", encrypted=encrypted)


def raw_copy_fsync(chunks: list[bytes], path: str) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for c in chunks:
            os.write(fd, c)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def ingest(backend, codec: ChunkCodec, chunks: list[bytes], threads: int) -> tuple[float, dict]:
    lock = threading.Lock()
    seen: set[bytes] = set()
    stats = {"stored": 0, "stored_bytes": 0, "zero": 0, "dedup": 0}

    def one(data: bytes) -> None:
        digest = codec.digest_or_zero(data)
        if digest == ZERO_DIGEST:
            with lock:
                stats["zero"] += 1
            return
        with lock:
            if digest in seen:
                stats["dedup"] += 1
                return
            seen.add(digest)
        obj = codec.encode(data, digest)
        backend.put_if_absent(chunk_key(digest), obj)
        with lock:
            stats["stored"] += 1
            stats["stored_bytes"] += len(obj)

    seconds, _ = timed(one, chunks, threads)
    return seconds, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=256, help="2 MiB chunks (default 256 = 512 MiB)")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in /var/tmp)")
    ap.add_argument("--quick", action="store_true", help="32 chunks (64 MiB)")
    ap.add_argument("--no-s3", action="store_true", help="skip the moto stages")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n = 32 if args.quick else args.chunks
    chunks = make_chunks(n)
    total = n * CHUNK_SIZE
    results: dict[str, dict] = {}

    def record(name: str, seconds: float, threads: int = 1, **extra) -> None:
        results[name] = {
            "seconds": seconds,
            "GBps": total / seconds / 1e9,
            "threads": threads,
            **extra,
        }

    plain = ChunkCodec(config(False))
    enc = ChunkCodec(config(True), os.urandom(32))
    nonzero = [c for c in chunks if any(c[:: 4096 * 7])]

    record("digest", *timed(lambda c: blake3.blake3(c).digest(), chunks)[:1])
    record(
        "digest AUTO threads",
        timed(lambda c: blake3.blake3(c, max_threads=blake3.blake3.AUTO).digest(), chunks)[0],
    )
    record("digest keyed", timed(enc.digest, chunks)[0])
    # Scaling with threads shows whether a library releases the GIL.
    record(
        f"digest keyed x{args.threads}", timed(enc.digest, chunks, args.threads)[0], args.threads
    )
    digests = [plain.digest(c) for c in chunks]
    sec, objs = timed(lambda i: plain.encode(chunks[i], digests[i]), range(n))
    stored = sum(len(o) for o in objs)
    record("zstd (encode plain)", sec, ratio=total / stored)
    aead = AESGCM(os.urandom(32))
    payloads = [o[16:] for o in objs]
    seal = lambda p: aead.encrypt(os.urandom(12), p, b"x" * 32)  # noqa: E731
    record("aes-gcm", timed(seal, payloads)[0])
    record(f"aes-gcm x{args.threads}", timed(seal, payloads, args.threads)[0], args.threads)
    record(
        f"zstd x{args.threads}",
        timed(lambda i: plain.encode(chunks[i], digests[i]), range(n), args.threads)[0],
        args.threads,
    )
    edigests = [enc.digest(c) for c in chunks]
    sec, eobjs = timed(lambda i: enc.encode(chunks[i], edigests[i]), range(n))
    record("encode enc (zstd+aes)", sec)
    record(
        f"encode enc x{args.threads}",
        timed(lambda i: enc.encode(chunks[i], edigests[i]), range(n), args.threads)[0],
        args.threads,
    )
    sec, _ = timed(lambda i: enc.decode(eobjs[i], edigests[i]), range(n))
    record("decode enc (verify)", sec)

    base_dir = args.dir or "/var/tmp"
    work = tempfile.mkdtemp(prefix="repo-ingest-", dir=base_dir)
    try:
        record("BASELINE raw copy+fsync", raw_copy_fsync(chunks, os.path.join(work, "raw.img")))
        os.unlink(os.path.join(work, "raw.img"))
        local = LocalBackend(os.path.join(work, "put"))
        record(
            "local put (encoded objs)", timed(lambda i: local.put(f"o/{i}", eobjs[i]), range(n))[0]
        )
        for threads in sorted({1, args.threads}):
            repo = LocalBackend(os.path.join(work, f"ingest{threads}"))
            sec, st = ingest(repo, enc, chunks, threads)
            record(f"local ingest enc x{threads}", sec, threads, **st)
            sec, st = ingest(
                LocalBackend(os.path.join(work, f"ingestp{threads}")), plain, chunks, threads
            )
            record(f"local ingest plain x{threads}", sec, threads, **st)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not args.no_s3:
        s3_stages(chunks, enc, args.threads, record)

    base = results["BASELINE raw copy+fsync"]["GBps"]
    s3_base = results.get("BASELINE raw S3 put", {}).get("GBps")
    if args.json:
        print(
            json.dumps(
                {"chunks": n, "bytes": total, "nonzero_chunks": len(nonzero), "results": results},
                indent=2,
            )
        )
        return 0
    print(
        f"data: {n} chunks of 2 MiB ({total / 2**20:.0f} MiB), stored size after zstd {results['zstd (encode plain)']['ratio']:.2f}x smaller; cpu={os.cpu_count()}"
    )
    print(f"{'stage':34} {'GB/s':>7} {'vs raw copy':>12} {'vs raw S3':>10}")
    for name, r in results.items():
        s3_ratio = f"{r['GBps'] / s3_base:9.2f}x" if s3_base and ("S3" in name) else ""
        print(f"{name:34} {r['GBps']:7.2f} {r['GBps'] / base:11.2f}x {s3_ratio:>10}")
    return 0


def s3_stages(chunks: list[bytes], codec: ChunkCodec, threads: int, record) -> None:
    import uuid
    from pathlib import Path

    from orchestrator.repo.backends import open_backend
    from orchestrator.repo.retry import RetryPolicy
    from tests.fixtures.s3 import CREDENTIALS, REGION, start_moto, stop_process

    for name, value in {**CREDENTIALS, "AWS_DEFAULT_REGION": REGION}.items():
        os.environ.setdefault(name, value)
    logdir = tempfile.mkdtemp(prefix="repo-ingest-moto-")
    server = start_moto(Path(logdir) / "moto.log")
    try:
        client = server.client()
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        sec = timed(
            lambda i: client.put_object(Bucket=bucket, Key=f"raw/{i}", Body=chunks[i]),
            range(len(chunks)),
            threads,
        )[0]
        record("BASELINE raw S3 put", sec, threads)
        backend = open_backend(
            f"s3://{bucket}/repo",
            endpoint_url=server.url,
            concurrency=threads,
            retry=RetryPolicy(deadline=120),
        )
        sec, st = ingest(backend, codec, chunks, threads)
        record(
            f"S3 ingest enc x{threads}", sec, threads, **st, calls=backend.retry.stats()["calls"]
        )
        backend.close()
    finally:
        stop_process(server.proc)
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
