"""Subprocess driven by test_crash.py: back up, prune or GC in a loop until killed.

    python -m tests.repo_ops.crash_driver REPO backup|maintain SEED

Prints ``ready`` once the repository is open, and (backup) ``committed`` after each backup.

Disk contents are a pure function of (vm, generation) (see ``model``), recorded in each restore
point's metadata, so the test can check any committed restore point after kill -9.
"""

from __future__ import annotations

import random
import sys
import time
import uuid

from orchestrator.repo.codec import CHUNK_SIZE
from orchestrator.repo.errors import NotFound, RepoError
from orchestrator.repo.locks import LeaseBusy
from orchestrator.repo.repository import Repository
from orchestrator.repo.writer import ChunksVanished
from tests.repo_ops.helpers import chunk_bytes

VMS = 3
CHUNKS = 3  # two full chunks and a short tail
TAIL = 8192
SIZE = (CHUNKS - 1) * CHUNK_SIZE + TAIL
LEASE_TTL = 3.0


def vm_uuid(n: int) -> str:
    return str(uuid.UUID(int=0xC0DE0000 + n))


def _changes(vm: int, i: int, gen: int) -> bool:
    return gen == 0 or random.Random(vm * 1_000_003 + i * 1009 + gen).random() < 0.4


def last_change(vm: int, i: int, gen: int) -> int:
    while not _changes(vm, i, gen):
        gen -= 1
    return gen


def chunk(vm: int, i: int, gen: int) -> bytes:
    g = last_change(vm, i, gen)
    length = CHUNK_SIZE if i < CHUNKS - 1 else TAIL
    if (vm + i + g) % 4 == 0:
        return bytes(length)  # some zero chunks
    return chunk_bytes((i * 7 + g) % 6 + 1000 * i, length)  # small pool: dedup across VMs


def model(vm: int, gen: int) -> bytes:
    return b"".join(chunk(vm, i, gen) for i in range(CHUNKS))


def backup_once(repo: Repository, rng: random.Random) -> None:
    n = rng.randrange(VMS)
    vm = vm_uuid(n)
    points = repo.list_restore_points(vm)
    base_key, base_gen = None, None
    if points and rng.random() < 0.8:
        meta = repo.read_metadata(points[-1])
        base_key = meta["disks"][0]["index"]
        base_gen = meta["metadata"]["gen"]
        gen = base_gen + 1
    else:
        gen = (repo.read_metadata(points[-1])["metadata"]["gen"] + 1) if points else 0
    vdi = str(uuid.UUID(int=0xD15C0000 + n))
    with repo.begin_backup(vm, lease_ttl=LEASE_TTL) as session:
        try:
            w = session.disk_writer(vdi, vdi, SIZE, base=base_key)
        except NotFound:
            base_key = None
            w = session.disk_writer(vdi, vdi, SIZE)
        for i in range(CHUNKS):
            if base_key is None or last_change(n, i, gen) != last_change(n, i, base_gen):
                w.put_chunk(i, chunk(n, i, gen))
        for _ in range(5):
            try:
                w.commit()
                break
            except ChunksVanished as exc:
                for i in exc.positions:
                    w.put_chunk(i, chunk(n, i, gen))
        session.commit({"vm_n": n, "gen": gen})


def main() -> None:
    url, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    repo = Repository.open(url)
    from orchestrator.jobs.gc import run_gc
    from orchestrator.jobs.prune import RetentionPolicy, run_prune

    print("ready", flush=True)
    while True:
        try:
            if mode == "backup":
                backup_once(repo, rng)
                print("committed", flush=True)  # the test may wait for one before its kill
            else:
                run_prune(repo, RetentionPolicy(keep_last=rng.randint(1, 2)))
                try:
                    run_gc(repo, margin=0, ttl=LEASE_TTL)
                except LeaseBusy:
                    time.sleep(0.1)
        except RepoError as exc:
            # an operational failure (e.g. a lease lapsed on a starved machine) is a refusal,
            # not damage; the test checks the repository afterwards. Bugs still print tracebacks.
            print(f"error: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
