"""The physical limits of the end-to-end question, run as their own process.

    python -m orchestrator.benchcmd.physical '{"kind": "copy", "files": [...], "dest": PATH}'
    python -m orchestrator.benchcmd.physical '{"kind": "s3-put", "files": [...], "endpoint": URL,
                                              "bucket": B, "prefix": P}'

``copy``: the disk's VHD files concatenated into ``dest`` (8 MiB reads and writes), then
``fdatasync`` — what a backup to that filesystem can at best do. ``s3-put``: each file uploaded as
plain objects with boto3's managed transfer (multipart, its default concurrency) — what a backup
to that S3 endpoint can at best do. The destination is removed afterwards (outside the timing
only in the sense that removal is cheap). Prints {"bytes": N}.
"""

from __future__ import annotations

import json
import os
import sys
import time

PIECE = 8 << 20


def copy(files: list[str], dest: str) -> int:
    total = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        buf = bytearray(PIECE)
        view = memoryview(buf)
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    done = 0
                    while done < n:
                        done += os.write(fd, view[done:n])
                    total += n
        os.fdatasync(fd)
    finally:
        os.close(fd)
        os.unlink(dest)
    return total


def s3_put(files: list[str], endpoint: str, bucket: str, prefix: str) -> int:
    import boto3

    # endpoint given: the bench's own S3 server; None: the standard AWS configuration chain
    s3 = boto3.client("s3", endpoint_url=endpoint) if endpoint else boto3.client("s3")
    total = 0
    keys = []
    for k, path in enumerate(files):
        key = f"{prefix}/{k}-{os.path.basename(path)}"
        s3.upload_file(path, bucket, key)
        keys.append({"Key": key})
        total += os.path.getsize(path)
    s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    return total


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    if spec["kind"] == "s3-put":
        import boto3  # noqa: F401  (its import is process start, not the data phase)
    t0 = time.perf_counter()
    if spec["kind"] == "copy":
        n = copy(spec["files"], spec["dest"])
    elif spec["kind"] == "s3-put":
        n = s3_put(spec["files"], spec["endpoint"], spec["bucket"], spec["prefix"])
    else:
        print(f"physical: unknown kind {spec['kind']!r}", file=sys.stderr)
        return 2
    # "seconds": the data phase (moving the bytes), comparable with a backup's data phase
    print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
