"""The maintenance worker: prune, GC and verify for many VMs and repositories in parallel.

Work is split into units: ``prune`` of one VM of one repository (VMs in parallel, like Xen
Orchestra's parallel merge worker), then ``gc`` of the repository once all its prunes ended,
then ``verify`` (or ``check``) of the repository. At most ``concurrency`` units run at once.

A journal (a local JSON file, replaced atomically after each unit: temporary file, fsync,
rename) records the units done. A worker that crashed (or was killed) and is started again with
the same repositories and policy resumes: units already done are skipped, the others run. Every
unit is idempotent anyway (prune recomputes its plan, GC and verify start over), so a unit that
was running at the crash simply runs again. When every unit has ended the journal is marked
finished and the next start begins a new run.

Jobs come from the command line (``fastpath worker --keep-last 7 REPO...``) or from a JSON job
file (``--jobs FILE``): ``[{"repo": "s3://b/p", "keep_last": 7, "keep_daily": 30,
"tasks": ["prune", "gc", "verify"], "verify_sample": 10}, ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from orchestrator.cliutil import UsageError, add_safety_arguments, open_repo
from orchestrator.jobs.gc import run_gc
from orchestrator.jobs.prune import RULES, RetentionPolicy, live_sessions, run_prune
from orchestrator.jobs.verify import run_check, run_verify
from orchestrator.progress import Progress
from orchestrator.repo.errors import RepoError

TASKS = ("prune", "gc", "verify", "check")
JOURNAL_VERSION = 1


@dataclass
class RepoJob:
    repo: str
    policy: RetentionPolicy | None
    tasks: tuple[str, ...] = ("prune", "gc", "verify")
    verify_sample: float | None = None
    gc_margin: float = 60.0

    def fingerprint(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "policy": self.policy.to_json() if self.policy else None,
            "tasks": list(self.tasks),
            "verify_sample": self.verify_sample,
        }


@dataclass
class Unit:
    id: str
    kind: str
    job: RepoJob
    vm: str | None = None
    deps: list[str] = field(default_factory=list)


class Journal:
    """The worker's state file, rewritten atomically after every unit."""

    def __init__(self, path: str, fingerprint: str, *, restart: bool = False):
        self.path = path
        self.lock = threading.Lock()
        self.resumed = False
        doc = None
        if not restart:
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except FileNotFoundError:
                doc = None
            except (OSError, ValueError):
                doc = None  # unreadable journal: start over (every unit is idempotent)
        if (
            isinstance(doc, dict)
            and doc.get("version") == JOURNAL_VERSION
            and doc.get("fingerprint") == fingerprint
            and not doc.get("finished")
            and isinstance(doc.get("units"), dict)
        ):
            self.doc = doc
            self.resumed = True
        else:
            self.doc = {
                "version": JOURNAL_VERSION,
                "fingerprint": fingerprint,
                "run": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
                "started": time.time(),
                "finished": False,
                "units": {},
            }
        self._write()

    def done(self, unit_id: str) -> bool:
        return self.doc["units"].get(unit_id, {}).get("state") == "done"

    def record(self, unit_id: str, state: str, summary: dict[str, Any]) -> None:
        with self.lock:
            self.doc["units"][unit_id] = {"state": state, "at": time.time(), **summary}
            self._write()

    def finish(self) -> None:
        with self.lock:
            self.doc["finished"] = True
            self.doc["ended"] = time.time()
            self._write()

    def _write(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path)) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.doc, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def default_journal_path() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "fastpath", "worker-journal.json")


def run_worker(
    jobs: list[RepoJob],
    *,
    concurrency: int = 4,
    journal_path: str | None = None,
    restart: bool = False,
    ui: Progress | None = None,
    open_repo: Callable[[str], Any],
    pause: float = 0.0,
) -> dict[str, Any]:
    """Run every job's units with at most ``concurrency`` at once. ``open_repo(url)`` opens a
    repository (the CLI passes one that knows the passphrase)."""
    ui = ui or Progress("quiet")
    fingerprint = hashlib.sha256(
        json.dumps([j.fingerprint() for j in jobs], sort_keys=True).encode()
    ).hexdigest()
    journal = Journal(journal_path or default_journal_path(), fingerprint, restart=restart)
    repos: dict[str, Any] = {}
    catalogs: dict[str, Any] = {}
    units: list[Unit] = []
    failures: dict[str, str] = {}
    results: dict[str, Any] = {}
    try:
        for job in jobs:
            try:
                repo = repos[job.repo] = open_repo(job.repo)
            except (RepoError, OSError, ValueError) as exc:
                # one unreachable repository must not stop the others
                failures[f"open {job.repo}"] = " ".join(str(exc).split())
                ui.log(f"open {job.repo}: FAILED: {failures[f'open {job.repo}']}", failed=True)
                continue
            prunes: list[str] = []
            if "prune" in job.tasks:
                cat = catalogs[job.repo] = repo.scan()
                for vm in sorted({p.vm for p in cat.restore_points()}):
                    u = Unit(f"prune {job.repo} {vm}", "prune", job, vm)
                    units.append(u)
                    prunes.append(u.id)
            last = prunes
            if "gc" in job.tasks:
                u = Unit(f"gc {job.repo}", "gc", job, deps=list(last))
                units.append(u)
                last = [u.id]
            for kind in ("verify", "check"):
                if kind in job.tasks:
                    u = Unit(f"{kind} {job.repo}", kind, job, deps=list(last))
                    units.append(u)
                    last = [u.id]
        skipped = [u.id for u in units if journal.done(u.id)]
        state = {u.id: ("done" if journal.done(u.id) else "todo") for u in units}
        lock = threading.Lock()
        live_by_repo: dict[str, set] = {}

        def execute(u: Unit) -> dict[str, Any]:
            repo = repos[u.job.repo]
            if u.kind == "prune":
                with lock:
                    if u.job.repo not in live_by_repo:
                        live_by_repo[u.job.repo] = live_sessions(repo)
                return run_prune(
                    repo,
                    u.job.policy,
                    vm=u.vm,
                    catalog=catalogs[u.job.repo],
                    live=live_by_repo[u.job.repo],
                )
            if u.kind == "gc":
                return run_gc(repo, margin=u.job.gc_margin)
            if u.kind == "verify":
                return run_verify(repo, sample=u.job.verify_sample)
            return run_check(repo)

        with (
            ui.task("worker", total=len(units), unit="units") as task,
            ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="worker") as pool,
        ):
            task.advance(len(skipped))
            running: dict[Future, Unit] = {}
            while True:
                for u in units:
                    if len(running) >= concurrency:
                        break
                    if state[u.id] != "todo":
                        continue
                    if any(state[d] in ("todo", "running") for d in u.deps):
                        continue
                    state[u.id] = "running"
                    running[pool.submit(execute, u)] = u
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    u = running.pop(fut)
                    try:
                        res = fut.result()
                    except (RepoError, OSError, ValueError) as exc:
                        state[u.id] = "failed"
                        failures[u.id] = " ".join(str(exc).split())
                        journal.record(u.id, "failed", {"error": failures[u.id]})
                        ui.log(f"{u.id}: FAILED: {failures[u.id]}", unit=u.id, failed=True)
                    else:
                        ok = bool(res.get("ok", True))
                        state[u.id] = "done"
                        summary = _summary(u.kind, res)
                        results[u.id] = summary
                        journal.record(u.id, "done", {"ok": ok, **summary})
                        if not ok:
                            failures[u.id] = "damage found"
                        ui.log(f"{u.id}: {'ok' if ok else 'DAMAGE'} {summary}", unit=u.id)
                    task.advance()
                    if pause:
                        time.sleep(pause)
            task.done(f"{len(units)} units, {len(failures)} failed, {len(skipped)} resumed")
        journal.finish()
    finally:
        for repo in repos.values():
            repo.close()
    return {
        "ok": not failures,
        "journal": journal.path,
        "resumed": journal.resumed,
        "units": len(units),
        "skipped_done": len(skipped),
        "ran": len(results) + len(failures),
        "failures": failures,
        "results": results,
    }


def _summary(kind: str, res: dict[str, Any]) -> dict[str, Any]:
    if kind == "prune":
        return {
            "kept": len(res["kept"]),
            "deleted": len(res["deleted"]) + len(res["deleted_incomplete"]),
        }
    if kind == "gc":
        return {k: res.get(k) for k in ("chunks_total", "chunks_deleted", "bytes_freed")}
    return {
        "chunks_checked": res.get("chunks_checked", res.get("chunks_referenced")),
        "affected_restore_points": sorted(res.get("affected_restore_points", {})),
    }


# -- CLI -----------------------------------------------------------------------------------------


def jobs_from_args(args: argparse.Namespace) -> list[RepoJob]:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UsageError(f"unknown task(s) {', '.join(bad)} (choose from {', '.join(TASKS)})")
    jobs: list[RepoJob] = []
    specs: list[dict[str, Any]] = []
    if args.jobs:
        try:
            with open(args.jobs, encoding="utf-8") as f:
                specs = json.load(f)
        except (OSError, ValueError) as exc:
            raise UsageError(f"job file {args.jobs}: {exc}") from None
        if not isinstance(specs, list):
            raise UsageError(f"job file {args.jobs}: expected a JSON list of jobs")
    for url in args.repos or []:
        specs.append({"repo": url})
    if not specs:
        raise UsageError("give at least one REPO or --jobs FILE")
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("repo"), str):
            raise UsageError(f"bad job {spec!r}: needs a 'repo'")
        job_tasks = tuple(spec.get("tasks", tasks))
        if any(t not in TASKS for t in job_tasks):
            raise UsageError(f"job {spec['repo']}: unknown task in {job_tasks}")
        policy = None
        if "prune" in job_tasks:
            values = {
                f"keep_{r}": int(spec.get(f"keep_{r}", getattr(args, f"keep_{r}"))) for r in RULES
            }
            try:
                policy = RetentionPolicy(**values)
            except ValueError as exc:
                raise UsageError(f"job {spec['repo']}: {exc}") from None
        jobs.append(
            RepoJob(
                spec["repo"],
                policy,
                job_tasks,
                spec.get("verify_sample", args.verify_sample),
                float(spec.get("gc_margin", args.gc_margin)),
            )
        )
    return jobs


def register(registry) -> None:
    from orchestrator.jobs.prune import add_policy_arguments

    p = registry.add(
        "worker", cmd_worker, help="prune, GC and verify many VMs/repositories in parallel"
    )
    p.add_argument("repos", metavar="REPO", nargs="*", help="repositories (or --jobs FILE)")
    p.add_argument("--jobs", metavar="FILE", help="JSON job file (a list of per-repo jobs)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N", help="units at once")
    p.add_argument("--tasks", default="prune,gc,verify", help="comma list of prune,gc,verify,check")
    add_policy_arguments(p)
    p.add_argument("--verify-sample", type=float, metavar="P", help="verify P percent")
    p.add_argument("--gc-margin", type=float, default=60.0, metavar="S")
    p.add_argument(
        "--journal", metavar="FILE", help=f"state file (default {default_journal_path()})"
    )
    p.add_argument("--restart", action="store_true", help="ignore an unfinished journal")
    p.add_argument("--passphrase-file", metavar="FILE")
    add_safety_arguments(p, legacy=False)
    p.add_argument("--pause-between-units", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(_render=_render)


def cmd_worker(args: argparse.Namespace, ui: Progress):
    if args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    jobs = jobs_from_args(args)
    result = run_worker(
        jobs,
        concurrency=args.concurrency,
        journal_path=args.journal,
        restart=args.restart,
        ui=ui,
        # prune and GC read metadata only: an encrypted repository needs its key for verify
        open_repo=lambda url: open_repo(
            args, url, need_key=any(t in ("verify",) for j in jobs for t in j.tasks)
        ),
        pause=args.pause_between_units,
    )
    return result, 0 if result["ok"] else 1


def _render(r: dict[str, Any]) -> str:
    lines = [f"FAILED {u}: {e}" for u, e in r["failures"].items()]
    lines.append(
        f"{'OK' if r['ok'] else 'FAILED'}: {r['units']} units, {r['ran']} ran, "
        f"{r['skipped_done']} already done (journal {r['journal']})"
    )
    return "\n".join(lines)


__all__ = ["Journal", "RepoJob", "run_worker"]
