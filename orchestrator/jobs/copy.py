"""``fastpath copy SRC DST``: copy restore points to a second repository (off-site, 3-2-1).

Between any two repositories (local and S3 either way, S3 to S3). For each complete restore
point of SRC (``--vm``, ``--since`` select) that DST does not hold complete:

1. the distinct chunks of its indexes that DST lacks (DST's ``chunks/`` is listed once per run;
   chunks DST marked damaged count as lacking) are read from SRC, decoded and checked against
   their digest (read again once on a mismatch, see ``Repository.read_chunk_object``) and stored
   in DST: the object as it is when both repositories compute the same digests (both
   unencrypted, or encrypted under the same data key, ``ChunkCodec.same_keys``), else
   re-encoded with DST's codec under DST's digest (the index entries are translated);
2. the point is committed in DST with the backup commit protocol (:mod:`orchestrator.repo.writer`):
   a writer session on DST (its lease holds DST's GC off the chunks just sent), each index written
   pending then final once every chunk is durable (``ChunksVanished`` from a concurrent GC: those
   chunks are sent again), then the restore point document, which keeps SRC's time, VM metadata,
   ``created`` and ``stats`` and adds ``copied_from``.

So a killed copy leaves nothing DST would show as a restore point, and a re-run sends only what
is missing (chunks already stored count as present, committed points are skipped). DST keeps its
own id, codec and retention: ``--keep-*`` prunes DST after the copy (never SRC).

``copy_repository(src, dst, options, ui)`` is the function a job's ``copy-to`` calls.
"""

from __future__ import annotations

import argparse
import calendar
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from orchestrator.cliutil import (
    CommandFailed,
    UsageError,
    add_plaintext_argument,
    add_safety_arguments,
    check_copy_ends,
    open_repo,
    passphrase_given,
)
from orchestrator.jobs.prune import (
    RULES,
    RetentionPolicy,
    add_policy_arguments,
    run_prune,
)
from orchestrator.progress import Progress
from orchestrator.repo import locks
from orchestrator.repo.catalog import RestorePoint, parse_time
from orchestrator.repo.codec import ZERO_DIGEST, chunk_key, digest_from_key
from orchestrator.repo.damage import damaged_digests
from orchestrator.repo.errors import CorruptChunk, NotFound, RepoError
from orchestrator.repo.index import Index
from orchestrator.repo.repository import Repository
from orchestrator.repo.writer import BackupSession, ChunksVanished

_SINCE_RE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class CopyOptions:
    vms: list[str] | None = None  # only these VMs (None: all)
    since: float | None = None  # only restore points at or after this epoch time
    policy: RetentionPolicy | None = None  # prune DST with it afterwards
    concurrency: int = 8  # chunks in flight
    lease_ttl: float = locks.DEFAULT_TTL


def parse_since(text: str, now: float | None = None) -> float:
    """``7d``/``12h``/``30m`` (ago), a restore point time, or an ISO date/time (UTC)."""
    m = _SINCE_RE.match(text)
    if m:
        return (time.time() if now is None else now) - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        return parse_time(text)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    raise ValueError(f"--since {text!r}: use 7d, 12h, 2026-12-01, 2026-12-01T08:00:00Z")


class _Copier:
    def __init__(self, src: Repository, dst: Repository, options: CopyOptions, ui: Progress):
        if src.config.chunk_size != dst.config.chunk_size:
            raise RepoError(
                f"cannot copy from {src.url} to {dst.url}: chunk sizes differ "
                f"({src.config.chunk_size} and {dst.config.chunk_size})"
            )
        self.src, self.dst, self.options, self.ui = src, dst, options, ui
        self.raw = dst.codec.same_keys(src.codec)
        self.lock = threading.Lock()
        self.present: set[bytes] = set()
        self.map: dict[bytes, bytes] = {}  # SRC digest -> DST digest (re-encoding only)
        self.counts = dict.fromkeys(
            ("chunks_sent", "chunks_present", "bytes_read", "bytes_sent", "marks_cleared"), 0
        )
        self.pool = ThreadPoolExecutor(max(1, options.concurrency), thread_name_prefix="copy")

    def list_present(self) -> None:
        damaged = damaged_digests(self.dst.backend)
        for info in self.dst.backend.list("chunks/"):
            try:
                d = digest_from_key(info.key)
            except ValueError:
                continue
            if d not in damaged:
                self.present.add(d)
        self.damaged = damaged

    def _count(self, **fields: int) -> None:
        with self.lock:
            for k, v in fields.items():
                self.counts[k] += v

    def transfer(self, session: BackupSession, digest: bytes, force: bool = False) -> bytes:
        """Make SRC chunk ``digest`` stored in DST (through ``session``); its DST digest."""
        if not force:
            with self.lock:
                mapped = digest if self.raw else self.map.get(digest)
                if mapped is not None and mapped in self.present:
                    self.counts["chunks_present"] += 1
                    return mapped
        obj, plain = self.src.read_chunk_object(digest)  # CorruptChunk: damaged in SRC
        if self.raw:
            mapped, out = digest, obj
        else:
            mapped = self.dst.codec.digest(plain)
            with self.lock:
                self.map[digest] = mapped
                known = mapped in self.present and not force
            if known:
                self._count(chunks_present=1, bytes_read=len(obj))
                return mapped
            out = self.dst.codec.encode(plain, mapped)
        session.durable.put(chunk_key(mapped), out)
        with self.lock:
            self.present.add(mapped)
            self.counts["chunks_sent"] += 1
            self.counts["bytes_read"] += len(obj)
            self.counts["bytes_sent"] += len(out)
            healed = mapped in self.damaged
            if healed:
                self.damaged.discard(mapped)
                self.counts["marks_cleared"] += 1
        if healed:
            with session.lock:
                session.healed.add(mapped)  # its mark is cleared once durable
        return mapped

    def send_all(self, session: BackupSession, digests: set[bytes], force: bool = False) -> None:
        futures = [self.pool.submit(self.transfer, session, d, force) for d in sorted(digests)]
        error = None
        for fut in futures:
            exc = fut.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error

    def translate(self, index: Index) -> Index:
        if self.raw:
            return index
        out = Index(index.disk_uuid, index.virtual_size, index.chunk_size, index.base)
        for i, d in enumerate(index.digests()):
            if d != ZERO_DIGEST:
                out.set(i, self.map[d])
        return out

    def copy_point(self, point: RestorePoint) -> dict[str, Any]:
        src, dst = self.src, self.dst
        doc = src.read_metadata(point)
        disks = src.point_disks(point, doc)  # authenticated: exactly the document's
        order = [d.get("vdi") for d in doc.get("disks", []) if isinstance(d, dict)]
        vdis = [v for v in order if v in disks] + sorted(set(disks) - set(order))
        indexes = {vdi: src.read_point_index(point, doc, vdi) for vdi in vdis}
        session = dst.begin_backup(
            point.vm,
            when=point.time,
            use_lookup=False,
            lease_ttl=self.options.lease_ttl,
            on_wait=self.ui.log,
        )
        with session:
            for vdi in vdis:
                index = indexes[vdi]
                self.send_all(session, index.referenced())
                mine = self.translate(index)
                w = session.disk_writer(
                    vdi, index.disk_uuid, index.virtual_size, base=mine, concurrency=1
                )
                w.index.base = index.base  # the same key in DST: copies keep the names
                for _attempt in range(5):
                    try:
                        w.commit()
                        break
                    except ChunksVanished as exc:  # a DST GC deleted some: send them again
                        again = {index.get(i) for i in exc.positions}
                        with self.lock:
                            self.present.difference_update(mine.get(i) for i in exc.positions)
                        self.send_all(session, again, force=True)
                else:
                    w.commit()
            document = {k: doc[k] for k in ("created", "stats") if k in doc}
            document["copied_from"] = {
                "repository": src.url,
                "repository_id": src.config.id,
                "id": point.id,
            }
            session.commit(doc.get("metadata") or {}, document=document)
        return {"id": point.id, "disks": len(vdis)}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def select_points(src: Repository, dst: Repository, options: CopyOptions):
    """(to copy, already in DST): complete SRC points by the options, oldest first."""
    have = {(p.vm, p.time) for p in dst.scan().restore_points(complete=True)}
    todo, skipped = [], []
    for p in src.scan().restore_points(complete=True):
        if options.vms and p.vm not in options.vms:
            continue
        if options.since is not None and p.timestamp < options.since:
            continue
        (skipped if (p.vm, p.time) in have else todo).append(p)
    todo.sort(key=lambda p: (p.time, p.vm))
    return todo, skipped


def copy_repository(
    src: Repository, dst: Repository, options: CopyOptions | None = None, ui: Progress | None = None
) -> dict[str, Any]:
    """Copy SRC's restore points to DST (see the module docstring); a JSON-able summary.
    A point that cannot be copied (damaged in SRC, pruned meanwhile) is reported in
    ``failed`` and the others are still copied; ``ok`` is False then."""
    options = options or CopyOptions()
    ui = ui or Progress("quiet")
    started = time.monotonic()
    if src.config.id == dst.config.id and src.url == dst.url:
        raise RepoError(f"{src.url}: source and destination are the same repository")
    copier = _Copier(src, dst, options, ui)
    copied: list[str] = []
    failed: list[dict[str, str]] = []
    try:
        todo, skipped = select_points(src, dst, options)
        copier.list_present()
        with ui.task("copy", total=len(todo), unit="restore points") as task:
            for point in todo:
                try:
                    copier.copy_point(point)
                    copied.append(point.id)
                except (CorruptChunk, NotFound) as exc:
                    failed.append({"id": point.id, "error": str(exc)})
                    ui.log(f"restore point {point.id} not copied: {exc}")
                task.advance()
            c = copier.counts
            task.done(
                f"{len(copied)} restore point(s) copied, {len(skipped)} already there, "
                f"{c['chunks_sent']} chunk(s) sent, {c['chunks_present']} present"
            )
    finally:
        copier.close()
    prune = None
    if options.policy is not None:
        prune = [
            run_prune(dst, options.policy, vm=vm, ui=ui)
            for vm in (sorted(set(options.vms)) if options.vms else [None])
        ]
    return {
        "ok": not failed,
        "src": src.url,
        "dst": dst.url,
        "mode": "as-is" if copier.raw else "re-encoded",
        "points_copied": len(copied),
        "points_skipped": len(skipped),
        "points_failed": len(failed),
        "copied": copied,
        "failed": failed,
        **copier.counts,
        "seconds": round(time.monotonic() - started, 3),
        "pruned": [i for r in prune for i in r["deleted"]] if prune else [],
    }


# -- CLI -----------------------------------------------------------------------------------------


def register(registry) -> None:
    p = registry.add(
        "copy", cmd_copy, help="copy restore points to another repository (incremental)"
    )
    p.add_argument("src", metavar="SRC", help="source repository: a directory or s3://...")
    p.add_argument("dst", metavar="DST", help="destination repository (initialised)")
    p.add_argument("--vm", action="append", metavar="UUID", help="only this VM (repeatable)")
    p.add_argument("--since", metavar="WHEN", help="only points since: 7d, 12h, 2026-12-01")
    add_policy_arguments(p)
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of SRC (and of DST)")
    p.add_argument("--dst-passphrase-file", metavar="FILE", help="passphrase of DST if it differs")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="chunks in flight")
    p.add_argument("--concurrency-io", type=int, default=16, metavar="N", help="connections")
    add_plaintext_argument(p)
    add_safety_arguments(p)
    p.set_defaults(_render=_render)


def options_from_args(args: argparse.Namespace) -> CopyOptions:
    options = CopyOptions(vms=args.vm or None, concurrency=max(1, args.concurrency))
    if args.since:
        try:
            options.since = parse_since(args.since)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if any(getattr(args, f"keep_{r}") for r in RULES):
        try:
            options.policy = RetentionPolicy(
                **{f"keep_{r}": getattr(args, f"keep_{r}") for r in RULES}
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return options


def cmd_copy(args: argparse.Namespace, ui: Progress):
    options = options_from_args(args)
    shared = not args.dst_passphrase_file  # --passphrase-file then serves SRC and DST
    with open_repo(args, args.src, shared_passphrase=shared) as src:
        dst_args = argparse.Namespace(**vars(args))
        if args.dst_passphrase_file:
            dst_args.passphrase_file = args.dst_passphrase_file
        with open_repo(dst_args, args.dst, shared_passphrase=shared) as dst:
            check_copy_ends(
                src, dst, allow_plaintext=args.allow_plaintext, passphrase=passphrase_given(args)
            )
            result = copy_repository(src, dst, options, ui)
    if not result["ok"]:
        raise CommandFailed(
            f"{result['points_failed']} restore point(s) not copied: {result['failed'][0]['error']}",
            result,
        )
    return result


def _render(r: dict[str, Any]) -> str:
    lines = [f"not copied {f['id']}: {f['error']}" for f in r.get("failed", [])]
    lines += [f"pruned {i} (in {r['dst']})" for i in r.get("pruned", [])]
    lines.append(
        f"{r['points_copied']} restore point(s) copied, {r['points_skipped']} already there; "
        f"{r['chunks_sent']} chunk(s) sent ({r['bytes_sent']} bytes, {r['mode']}), "
        f"{r['chunks_present']} already present; {r['seconds']} s"
    )
    return "\n".join(lines)


__all__ = ["CopyOptions", "copy_repository", "parse_since", "select_points"]
