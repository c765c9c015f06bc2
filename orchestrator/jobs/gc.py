"""GC: delete chunks no restore point needs, safely while backups and prunes run.

Algorithm (one run)
-------------------
G1. Take the exclusive ``gc`` lease (locks.acquire_exclusive; heartbeat; every delete batch
    first checks that enough lease lifetime remains).
G2. Close the deletion lists of crashed runs (their lease is gone: they delete nothing more).
G3. Scan ``backups/``, then list writer leases: live ones are running backups; the pending
    indexes of writers whose lease is gone or expired are deleted (those sessions can never
    commit, see the writer's lease check). The order matters: a writer that starts after the
    listing cannot have a pending index in the earlier scan.
G4. Mark: read every final index and every pending index of a live writer; a damaged index
    stops GC (its chunks are unknown, so nothing may be swept) unless ``force``.
G5. List ``chunks/``. Candidates = unmarked chunks whose mtime is older than
    ``cutoff = min(GC lease start, oldest live writer start) - margin``. (The cutoff spares the
    chunks running writers are uploading; it is an optimisation, safety comes from G6-G8.)
G6. **Publish** the candidate digests as ``locks/gc-deleted/<run>.list`` before deleting anything.
G7. Re-scan ``backups/`` and mark from every final index not read in G4 (committed meanwhile)
    and from every pending index, read again even if G4 read it: a pending key is not
    immutable (a commit that raised ChunksVanished removed it and its retry writes it again).
    Their chunks leave the candidate set.
G8. Delete the remaining candidates in batches, then write ``<run>.done``.
G9. Remove the lists (and .done markers) of runs that finished before the oldest live writer
    started; write the dedup cache (the marked set's prefixes); release the lease.

Writer side (``DiskWriter.commit`` in orchestrator/repo/writer.py, the list check in
orchestrator/repo/deletions.py): W1 write the index as ``.pending``; W2 read every deletion list;
for each digest of the index named in a list, wait until that run is done (or its lease is dead)
and check the chunk exists; if one is gone, remove the pending index and raise ChunksVanished
(the backup job re-puts those chunks and commits again); W3 write the final index.
The writer lease is taken before the writer reads anything (base index, dedup lookup), and a
writer whose lease lapsed refuses to commit.

Why no committed index can reference a deleted chunk
----------------------------------------------------
GC only deletes digests it published in a list first (G6 before G8). Take a writer committing an
index I that references digest d, and a GC run R that deletes d. Let P be the time R's list
appears, and W1 < W2 the writer's pending write and list read.

* If W2 is after P, the writer sees R's list, waits until R can delete nothing more, and finds d
  missing: it does not commit (ChunksVanished). If d still exists then, R did not delete it.
* If W2 is before P, then W1 < P < G7, so R's re-scan (G7) sees the pending index (or the final
  one that replaced it) and takes d out of its candidates: R does not delete d. (Between W1 and
  the final write the pending index exists, so G7 sees one of them; G7 reads every pending index
  it lists, since the same pending key may have been read, or found gone, in G4 during an
  earlier commit attempt of the same writer — test_gc_windows.py pins that window down.)

This holds whatever the writer's knowledge of d came from: a chunk it uploaded itself, its base
index, or the cross-VM lookup built from indexes that prune deleted a moment later — the case
where "the last referencing index was just pruned" is exactly the first bullet: the writer
deduplicated against d, prune removed the last index holding d, GC published and deleted d, and
the writer's commit check catches it. Lists live long enough: a list is removed only once its run
is done and every live writer started after that (G9), and a writer started later reads indexes
that were all committed after validation against every run that could have deleted their chunks.

Assumptions, stated: the backend is strongly consistent (list-after-write; local filesystems,
AWS S3 and moto are); leases judge liveness with backend mtimes against local clocks, so clocks
agree to within the lease ttl's slack (ttl/3 refresh, the other 2/3 of the ttl is slack); a GC
process paused longer than ``ttl - margin`` between its lease check and a delete batch could
delete after its lease expired — the check keeps ``margin`` seconds of lifetime, so a batch must
take far less than that (batches are 1000 keys, one DeleteObjects call on S3).
"""

from __future__ import annotations

import argparse
import time
from array import array
from collections.abc import Callable
from typing import Any

from orchestrator.cliutil import add_repo_argument, open_repo
from orchestrator.lazy import numpy as np
from orchestrator.progress import Progress
from orchestrator.repo import locks
from orchestrator.repo.catalog import fetch_many, format_time, scan_backups
from orchestrator.repo.codec import DIGEST_SIZE, chunk_key, digest_from_key
from orchestrator.repo.dedup import CACHE_KEY, DigestLookup, prefixes, records
from orchestrator.repo.deletions import DELETIONS_PREFIX, encode_deletion_list
from orchestrator.repo.errors import CorruptIndex, RepoError
from orchestrator.repo.repository import Repository

_REC = f"V{DIGEST_SIZE}"  # dtype: one digest


class GcRefused(RepoError):
    """GC cannot run safely (e.g. a damaged index: the chunks it references are unknown)."""


class _Marker:
    """The set of referenced digests, merged in batches (bounded temporary memory)."""

    def __init__(self, flush_bytes: int = 64 << 20):
        self.marked = np.empty(0, dtype=_REC)
        self._parts: list[np.ndarray] = []
        self._size = 0
        self._flush = flush_bytes

    def add(self, entries: bytes | bytearray | memoryview) -> None:
        recs = records(entries)
        self._parts.append(recs)
        self._size += recs.nbytes
        if self._size >= self._flush:
            self.finish()

    def finish(self) -> np.ndarray:
        if self._parts:
            self.marked = np.unique(np.concatenate([self.marked, *self._parts]))
            self._parts, self._size = [], 0
        return self.marked


def _read_indexes(repo, keys, marker, ui_task, damaged, seen) -> None:
    for key, data in fetch_many(repo.backend, keys):
        if data is None:
            seen.add(key)  # pruned (or finalised) meanwhile
            ui_task.advance()
            continue
        try:
            index = repo.decode_index(key, data)
        except CorruptIndex as exc:
            damaged.append({"index": key, "error": str(exc)})
        else:
            marker.add(index.entries)
        seen.add(key)
        ui_task.advance()


def run_gc(
    repo: Repository,
    *,
    dry_run: bool = False,
    force: bool = False,
    ui: Progress | None = None,
    ttl: float = locks.DEFAULT_TTL,
    margin: float = 60.0,
    batch: int = 1000,
    hooks: dict[str, Callable[[], None]] | None = None,
) -> dict[str, Any]:
    """One GC run (see the module docstring). Returns a JSON-able report.

    ``margin`` (seconds) is subtracted from the sweep cutoff and kept as remaining lease life
    before each delete batch; ``hooks`` lets tests pause at named steps ("scanned": after G3,
    "marked": after G4, "before_publish", "published", "before_delete", "deleted").
    """
    ui = ui or Progress("quiet")
    hooks = hooks or {}
    backend = repo.backend
    started = time.monotonic()
    lease = locks.acquire_exclusive(backend, "gc", ttl=ttl, info={"dry_run": dry_run})
    try:
        run = f"{format_time(time.time())}.{lease.token}"
        report: dict[str, Any] = {"ok": True, "repo": repo.url, "run": run, "dry_run": dry_run}

        # G2: close the lists of crashed runs (we hold the lease: they are dead)
        lists = {i.key for i in backend.list(DELETIONS_PREFIX)}
        for key in lists:
            if key.endswith(".list") and key[:-5] + ".done" not in lists and not dry_run:
                backend.put(key[:-5] + ".done", b"closed by a later run\n")

        # G3: writers. Scan first, list leases second: a pending index seen in the scan was
        # written under a lease that existed then, so a writer missing from the later listing
        # is dead (or finished, and then it already replaced its pending index itself).
        cat = scan_backups(backend)
        writers = locks.list_writer_leases(backend)
        live = [w for w in writers if not w.expired()]
        live_sessions = {
            (str((w.body.get("info") or {}).get("vm")), str((w.body.get("info") or {}).get("time")))
            for w in live
        }
        stale_pending = [k for k, vm, t in cat.pending if (vm, t) not in live_sessions]
        live_pending = [k for k, vm, t in cat.pending if (vm, t) in live_sessions]
        if not dry_run:
            backend.delete_many(stale_pending)
            backend.delete_many([w.key for w in writers if w.expired()])
        report["writers_live"] = len(live)
        report["pending_removed"] = 0 if dry_run else len(stale_pending)
        if "scanned" in hooks:
            hooks["scanned"]()

        # G4: mark
        marker = _Marker()
        damaged: list[dict[str, str]] = []
        seen: set[str] = set()
        keys = cat.indexes + live_pending
        with ui.task("gc mark", total=len(keys), unit="indexes") as t:
            _read_indexes(repo, keys, marker, t, damaged, seen)
            marked = marker.finish()
            t.done(f"{len(marked)} chunks referenced by {len(keys)} indexes")
        if "marked" in hooks:
            hooks["marked"]()
        report["indexes"] = len(cat.indexes)
        report["chunks_referenced"] = int(len(marked))
        if damaged:
            report["damaged_indexes"] = damaged
            if not force:
                raise GcRefused(
                    f"{repo.url}: {len(damaged)} damaged index(es) (first: {damaged[0]['index']}); "
                    f"GC cannot know which chunks they reference (run verify; --force to sweep)"
                )

        # G5: candidates
        oldest = min([lease.started] + [w.started for w in live])
        cutoff = oldest - margin
        listed = bytearray()  # 32 bytes per old chunk, sizes alongside (compact at TB scale)
        sizes = array("q")
        total_chunks = 0
        total_bytes = 0
        with ui.task("gc list chunks", unit="chunks") as t:
            for info in backend.list("chunks/"):
                try:
                    digest = digest_from_key(info.key)
                except ValueError:
                    continue
                total_chunks += 1
                total_bytes += info.size
                if info.mtime < cutoff:
                    listed += digest
                    sizes.append(info.size)
                t.advance()
            t.done(f"{total_chunks} chunks")
        old = np.frombuffer(bytes(listed), dtype=_REC)
        keep = ~np.isin(old, marked) if len(old) else np.zeros(0, dtype=bool)
        candidates = old[keep]
        cand_sizes = (
            np.frombuffer(sizes, dtype=np.int64)[keep] if len(old) else np.zeros(0, np.int64)
        )
        old_count = len(old)
        del listed, sizes, old
        report["chunks_total"] = total_chunks
        report["bytes_total"] = total_bytes
        report["candidates"] = int(len(candidates))
        report["spared_recent"] = total_chunks - old_count
        if dry_run:
            report["chunks_deleted"] = 0
            report["bytes_freed"] = 0
            report["would_delete"] = int(len(candidates))
            report["would_free"] = int(cand_sizes.sum())
            report["seconds"] = round(time.monotonic() - started, 3)
            return report

        deleted = 0
        freed = 0
        list_key = f"{DELETIONS_PREFIX}{run}.list"
        if len(candidates):
            # G6: publish before deleting
            meta = {
                "run": run,
                "lease": lease.key,
                "token": lease.token,
                "ttl": ttl,
                "created": time.time(),
            }
            if "before_publish" in hooks:
                hooks["before_publish"]()
            backend.put(list_key, encode_deletion_list(meta, candidates))
            if "published" in hooks:
                hooks["published"]()

            # G7: re-scan; indexes committed meanwhile protect their chunks. Every pending index
            # is read again, even one read (or found gone) in G4: a writer whose check raised
            # ChunksVanished removed it and wrote it again under the same key, and the new one
            # may be its only trace until the final index lands after this scan.
            cat2 = scan_backups(backend)
            new_keys = [k for k in cat2.indexes if k not in seen] + [p[0] for p in cat2.pending]
            marker2 = _Marker()
            damaged2: list[dict[str, str]] = []
            with ui.task("gc re-mark", total=len(new_keys), unit="indexes") as t:
                _read_indexes(repo, new_keys, marker2, t, damaged2, seen)
                t.done()
            if damaged2:
                report.setdefault("damaged_indexes", []).extend(damaged2)
                if not force:
                    backend.put(f"{DELETIONS_PREFIX}{run}.done", b"aborted\n")
                    raise GcRefused(
                        f"{repo.url}: damaged index {damaged2[0]['index']} appeared during GC"
                    )
            late = marker2.finish()
            if len(late):
                still = ~np.isin(candidates, late)
                candidates, cand_sizes = candidates[still], cand_sizes[still]
            report["rescued_by_new_indexes"] = int(report["candidates"] - len(candidates))
            if "before_delete" in hooks:
                hooks["before_delete"]()

            # G8: delete in batches, each after a lease check
            with ui.task("gc sweep", total=len(candidates), unit="chunks") as t:
                for start in range(0, len(candidates), batch):
                    group = [c.tobytes() for c in candidates[start : start + batch]]
                    lease.check(margin=max(margin, ttl / 3))
                    backend.delete_many([chunk_key(d) for d in group])
                    deleted += len(group)
                    freed += int(cand_sizes[start : start + batch].sum())
                    t.advance(len(group))
                t.done(f"{deleted} chunks deleted")
            backend.put(f"{DELETIONS_PREFIX}{run}.done", b"done\n")
            if "deleted" in hooks:
                hooks["deleted"]()
        report["chunks_deleted"] = deleted
        report["bytes_freed"] = freed

        # G9: old lists, dedup cache
        report["lists_removed"] = _remove_old_lists(backend, margin)
        lookup = DigestLookup(np.unique(prefixes(marked)), cat.indexes)
        backend.put(CACHE_KEY, lookup.encode())
        report["dedup_lookup_bytes"] = lookup.nbytes
        report["seconds"] = round(time.monotonic() - started, 3)
        return report
    finally:
        lease.release()


def _remove_old_lists(backend, margin: float) -> int:
    """Delete lists of runs that finished before every live writer started (fresh listing)."""
    entries = {i.key: i for i in backend.list(DELETIONS_PREFIX)}
    live = [w for w in locks.list_writer_leases(backend) if not w.expired()]
    limit = min((w.started for w in live), default=float("inf")) - margin
    victims = []
    for key, info in entries.items():
        if key.endswith(".done") and info.mtime < limit:
            victims += [key, key[:-5] + ".list"]
    if victims:
        backend.delete_many(victims)
    return len(victims) // 2


# -- CLI -----------------------------------------------------------------------------------------


def register(registry) -> None:
    p = registry.add("gc", cmd_gc, help="delete chunks that no restore point references")
    add_repo_argument(p)
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument(
        "--force", action="store_true", help="sweep even when some index is damaged (unsafe)"
    )
    p.add_argument(
        "--margin",
        type=float,
        default=60.0,
        metavar="S",
        help="spare chunks written less than S seconds before the oldest running backup",
    )
    p.set_defaults(_render=_render)


def cmd_gc(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    with open_repo(args, need_key=False) as repo:
        return run_gc(repo, dry_run=args.dry_run, force=args.force, ui=ui, margin=args.margin)


def _render(r: dict[str, Any]) -> str:
    if r["dry_run"]:
        return (
            f"{r['chunks_total']} chunks, {r['chunks_referenced']} referenced; would delete "
            f"{r['would_delete']} ({r['would_free']} bytes)"
        )
    return (
        f"{r['chunks_total']} chunks, {r['chunks_referenced']} referenced, "
        f"{r['chunks_deleted']} deleted ({r['bytes_freed']} bytes freed) in {r['seconds']} s"
    )


__all__ = ["GcRefused", "run_gc"]
