"""The maintenance worker: parallel units, journal, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

from orchestrator.jobs.prune import RetentionPolicy
from orchestrator.jobs.verify import run_verify
from orchestrator.jobs.worker import RepoJob, run_worker
from orchestrator.repo.repository import Repository
from tests.repo_ops.helpers import DiskModel, backup, restore


def make_repo(path, vms: int, points: int, seed: int = 0) -> dict[str, bytes]:
    """``vms`` VMs with ``points`` restore points each; returns the newest data per VM."""
    repo = Repository.init(path)
    newest = {}
    for n in range(vms):
        vm = str(uuid.UUID(int=seed * 1000 + n + 1))
        disk = DiskModel(chunks=0, tail=64 * 1024, seed=n)
        keys = None
        for gen in range(points):
            disk.write_chunk(0, seed=seed * 10000 + n * 100 + gen)
            _, keys = backup(repo, vm, [disk], bases=keys)
        newest[vm] = bytes(disk.data)
    repo.close()
    return newest


def check_pruned(path, newest, keep: int = 1):
    repo = Repository.open(path)
    try:
        points = repo.list_restore_points()
        by_vm = {}
        for p in points:
            by_vm.setdefault(p.vm, []).append(p)
        assert set(by_vm) == set(newest)
        for vm, ps in by_vm.items():
            assert len(ps) == keep
            (key,) = ps[-1].disks.values()
            assert restore(repo, key) == newest[vm]
        assert run_verify(repo)["ok"]
        # GC ran after the prunes: no chunk is left that nothing references
        assert len(list(repo.backend.list("chunks/"))) == len(by_vm) * keep
    finally:
        repo.close()


def test_worker_runs_prune_gc_verify_for_many_repositories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    newest_a = make_repo(a, vms=4, points=3, seed=1)
    newest_b = make_repo(b, vms=3, points=2, seed=2)
    policy = RetentionPolicy(keep_last=1)
    jobs = [
        RepoJob(str(a), policy, gc_margin=0),
        RepoJob(str(b), policy, ("prune", "gc", "check"), gc_margin=0),
    ]
    result = run_worker(
        jobs, concurrency=3, journal_path=str(tmp_path / "j.json"), open_repo=Repository.open
    )
    assert result["ok"], result
    assert result["units"] == 4 + 2 + 3 + 2 and result["ran"] == result["units"]
    check_pruned(a, newest_a)
    check_pruned(b, newest_b)
    journal = json.loads((tmp_path / "j.json").read_text())
    assert journal["finished"] and all(u["state"] == "done" for u in journal["units"].values())
    # a finished journal starts a new run next time
    again = run_worker(
        jobs, concurrency=3, journal_path=str(tmp_path / "j.json"), open_repo=Repository.open
    )
    assert not again["resumed"] and again["skipped_done"] == 0


def test_worker_reports_a_failing_repository_and_goes_on(tmp_path):
    good = tmp_path / "good"
    newest = make_repo(good, vms=2, points=2)
    jobs = [
        RepoJob(str(tmp_path / "missing"), RetentionPolicy(keep_last=1)),
        RepoJob(str(good), RetentionPolicy(keep_last=1), gc_margin=0),
    ]

    def opener(url):
        return Repository.open(url, create=False)

    result = run_worker(jobs, journal_path=str(tmp_path / "j.json"), open_repo=opener)
    assert not result["ok"]
    (failed,) = result["failures"]
    assert failed == f"open {tmp_path / 'missing'}"
    assert "no repository" in result["failures"][failed]
    check_pruned(good, newest)  # the other repository was fully maintained


def test_worker_resumes_after_kill_9(tmp_path):
    repo_path = tmp_path / "r"
    newest = make_repo(repo_path, vms=6, points=3)
    journal = tmp_path / "journal.json"
    cmd = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "worker",
        "--concurrency",
        "1",
        "--keep-last",
        "1",
        "--gc-margin",
        "0",
        "--journal",
        str(journal),
        "--json",
        str(repo_path),
    ]
    proc = subprocess.Popen(
        [*cmd, "--pause-between-units", "0.4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline:
            try:
                doc = json.loads(journal.read_text())
                done = sum(u["state"] == "done" for u in doc["units"].values())
            except (OSError, ValueError):
                done = 0
            if done >= 2:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    doc = json.loads(journal.read_text())
    assert not doc["finished"]
    done_before = {u for u, v in doc["units"].items() if v["state"] == "done"}
    assert 2 <= len(done_before) < 8  # 6 prunes + gc + verify
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["resumed"] and result["skipped_done"] == len(done_before)
    assert result["ran"] == result["units"] - len(done_before)
    assert not set(result["results"]) & done_before  # done units were not run again
    check_pruned(repo_path, newest)


def test_worker_job_file_via_cli(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    newest_a = make_repo(a, vms=2, points=3, seed=3)
    make_repo(b, vms=2, points=3, seed=4)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(
        json.dumps(
            [
                {"repo": str(a), "keep_last": 1, "gc_margin": 0},
                {"repo": str(b), "keep_last": 2, "tasks": ["prune", "check"]},
            ]
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "worker",
            "--jobs",
            str(jobs),
            "--json",
            "--journal",
            str(tmp_path / "j.json"),
            "--concurrency",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["ok"] and result["units"] == (2 + 1 + 1) + (2 + 1)
    check_pruned(a, newest_a)
    with Repository.open(b) as repo:
        assert len(repo.list_restore_points()) == 4  # keep 2 of 3 per VM, no GC asked
    bad = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "worker", "--jobs", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "job file" in bad.stderr


def test_journal_rules(tmp_path):
    from orchestrator.jobs.worker import Journal

    path = tmp_path / "j.json"
    j = Journal(str(path), "fp1")
    j.record("unit a", "done", {"x": 1})
    j.record("unit b", "failed", {"error": "boom"})
    again = Journal(str(path), "fp1")
    assert again.resumed and again.done("unit a") and not again.done("unit b")
    assert not Journal(str(path), "fp2").resumed  # other jobs or policy: a new run
    Journal(str(path), "fp1").finish()
    assert not Journal(str(path), "fp1").resumed  # finished: a new run
    path.write_text("{ torn")
    broken = Journal(str(path), "fp1")  # unreadable: start over (every unit is idempotent)
    assert not broken.resumed and json.loads(path.read_text())["units"] == {}
    assert not Journal(str(path), "fp1", restart=True).resumed
