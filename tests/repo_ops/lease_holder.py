"""Subprocess for test_dead_holders.py: take a lease (or stop a GC run mid-way), say "ready",
then sleep until killed.

    python -m tests.repo_ops.lease_holder REPO writer VM     a writer lease for VM (a backup)
    python -m tests.repo_ops.lease_holder REPO gc            the GC lease, nothing else
    python -m tests.repo_ops.lease_holder REPO gc-run        a GC run stopped after publishing
                                                             its deletion list, before deleting
"""

from __future__ import annotations

import sys
import time

from orchestrator.jobs.gc import run_gc
from orchestrator.repo import locks
from orchestrator.repo.catalog import format_time
from orchestrator.repo.repository import Repository


def ready() -> None:
    print("ready", flush=True)
    time.sleep(3600)


def main(argv: list[str]) -> None:
    repo = Repository.open(argv[0])
    what = argv[1]
    if what == "writer":
        vm, when = argv[2], format_time(time.time())
        locks.acquire_writer_lease(repo.backend, f"{vm}.{when}", info={"vm": vm, "time": when})
        ready()
    elif what == "gc":
        locks.acquire_exclusive(repo.backend, "gc")
        ready()
    elif what == "gc-run":
        run_gc(repo, margin=0, hooks={"before_delete": ready})
        print("nothing to delete", flush=True)
    else:
        raise SystemExit(f"unknown mode {what}")


if __name__ == "__main__":
    main(sys.argv[1:])
