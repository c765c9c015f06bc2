"""Crash safety: kill -9 backup, prune and GC processes at random points, many times; then
verify is clean and every committed restore point restores its model."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from orchestrator.jobs.gc import run_gc
from orchestrator.jobs.prune import RetentionPolicy, run_prune
from orchestrator.jobs.verify import run_check, run_verify
from orchestrator.repo import locks
from orchestrator.repo.repository import Repository
from tests.repo_ops import crash_driver
from tests.repo_ops.helpers import restore

TRIALS = 12


def start(url, mode, seed):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.repo_ops.crash_driver", str(url), mode, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # imports done, repository open
    assert line.strip() == "ready", proc.stderr.read() if proc.poll() is not None else line
    return proc


def kill(proc):
    proc.kill()  # SIGKILL
    proc.wait(30)
    err = proc.stderr.read()
    assert "Traceback" not in err, err  # it died of the signal, not of a bug
    proc.stdout.close()
    proc.stderr.close()


def check_everything(repo: Repository) -> int:
    points = repo.list_restore_points()
    for p in points:
        meta = repo.read_metadata(p)["metadata"]
        (key,) = p.disks.values()
        assert restore(repo, key) == crash_driver.model(meta["vm_n"], meta["gen"]), p.id
    return len(points)


@pytest.mark.slow
def test_kill_9_during_backup_prune_and_gc(tmp_path):
    url = tmp_path / "repo"
    Repository.init(url).close()
    rng = random.Random(1234)
    for trial in range(TRIALS):
        backup_proc = start(url, "backup", trial)
        maint_proc = start(url, "maintain", 1000 + trial) if trial % 3 != 2 else None
        # kill each at its own random point
        delays = sorted(
            [("b", rng.uniform(0.05, 0.8))]
            + ([("m", rng.uniform(0.05, 0.8))] if maint_proc else []),
            key=lambda d: d[1],
        )
        if trial % 4 == 0:
            # let this backup commit once before its random kill: the final checks need some
            # committed restore points, which random delays alone need not give a loaded machine
            line = backup_proc.stdout.readline()
            assert line.strip() == "committed", backup_proc.stderr.read() if not line else line
        t0 = time.monotonic()
        for who, delay in delays:
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
            kill(backup_proc if who == "b" else maint_proc)
        if trial % 4 == 3:
            with Repository.open(url) as repo:
                assert run_check(repo)["ok"]
    # after the last crash: leases of the dead expire, then a normal prune + GC cleans up
    time.sleep(crash_driver.LEASE_TTL + 0.5)
    with Repository.open(url) as repo:
        assert not [w for w in locks.list_writer_leases(repo.backend) if not w.expired()]
        run_prune(repo, RetentionPolicy(keep_last=100))  # removes incomplete points only
        gc = run_gc(repo, margin=0)
        assert gc["writers_live"] == 0
        assert not repo.scan().pending
        report = run_verify(repo)
        assert report["ok"], {k: v for k, v in report.items() if k != "repo"}
        assert check_everything(repo) > 0
        # and the chunk store holds nothing unreferenced
        assert run_gc(repo, margin=0)["chunks_deleted"] == 0
