"""Verify, check and stats.

``verify``: every chunk referenced by every index is read once, decoded (decrypted and
authenticated when encrypted) and its digest checked; damaged or missing chunks and indexes that
do not decode are reported with the restore points they affect. ``--sample P`` checks a random
P percent of the unique chunks (every index is still decoded).

``check``: structure only — every index decodes, every restore point's JSON parses and names
indexes that exist, and every referenced chunk exists (one listing of ``chunks/``, no reads).

A damaged index is reported, never half-trusted: nothing of it is used (its digests are unknown).
"""

from __future__ import annotations

import argparse
import random
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from orchestrator.cliutil import UsageError, add_repo_argument, open_repo
from orchestrator.lazy import numpy as np
from orchestrator.progress import Progress
from orchestrator.repo.catalog import Catalog, fetch_many, named_disks
from orchestrator.repo.codec import DIGEST_SIZE, chunk_key, digest_from_key
from orchestrator.repo.damage import clear_mark, damaged_digests, mark_damaged
from orchestrator.repo.dedup import records
from orchestrator.repo.errors import (
    CorruptChunk,
    CorruptIndex,
    NotFound,
    PassphraseRequired,
    RepoError,
    Tampered,
)
from orchestrator.repo.repository import MissingKeyCodec, Repository

_REC = f"V{DIGEST_SIZE}"  # dtype: one digest


def _point_of(cat: Catalog) -> dict[str, str]:
    """index key -> restore point id."""
    out = {}
    for p in cat.points.values():
        for key in p.disks.values():
            out[key] = p.id
    return out


def _scan_indexes(repo: Repository, cat: Catalog, ui: Progress, macs: dict | None = None):
    """Decode every index. Returns (unique digests, damaged index reports, short chunk lengths).
    ``macs``: filled with index key -> header MAC (to check them against the documents)."""
    point_of = _point_of(cat)
    damaged: list[dict[str, Any]] = []
    parts: list[np.ndarray] = []
    unique = np.empty(0, dtype=_REC)
    short: dict[bytes, int] = {}
    logical = 0
    with ui.task("read indexes", total=len(cat.indexes), unit="indexes") as t:
        for n, (key, data) in enumerate(fetch_many(repo.backend, cat.indexes)):
            if data is None:
                t.advance()
                continue  # pruned while we ran
            try:
                index = repo.decode_index(key, data)
            except CorruptIndex as exc:
                damaged.append(
                    {"index": key, "restore_point": point_of.get(key), "error": str(exc)}
                )
                t.advance()
                continue
            if macs is not None:
                macs[key] = index.mac
            recs = records(index.entries)
            logical += len(recs) * index.chunk_size
            tail = index.virtual_size % index.chunk_size
            if tail and len(index):
                last = index.get(len(index) - 1)
                if any(last):
                    short[last] = tail
                    logical -= index.chunk_size - tail
            parts.append(recs)
            if n % 64 == 63:
                unique = np.unique(np.concatenate([unique, *parts]))
                parts = []
            t.advance()
        if parts:
            unique = np.unique(np.concatenate([unique, *parts]))
        t.done(f"{len(cat.indexes)} indexes, {len(damaged)} damaged, {len(unique)} unique chunks")
    return unique, damaged, short, logical


def _affected(repo: Repository, cat: Catalog, bad: set[bytes]) -> dict[str, list[str]]:
    """Restore point id -> the bad digests (hex) it references (second pass over indexes)."""
    if not bad:
        return {}
    point_of = _point_of(cat)
    bad_arr = np.frombuffer(b"".join(sorted(bad)), dtype=_REC)
    out: dict[str, set[str]] = {}
    for key, data in fetch_many(repo.backend, cat.indexes):
        if data is None:
            continue
        try:
            index = repo.decode_index(key, data)
        except CorruptIndex:
            continue
        common = np.intersect1d(records(index.entries), bad_arr)
        if len(common):
            rp = point_of.get(key, key)
            out.setdefault(rp, set()).update(c.tobytes().hex() for c in common)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _check_points(repo: Repository, cat: Catalog, macs: dict | None = None):
    """Restore point documents that do not parse, fail authentication (encrypted), name
    missing indexes, or (authenticated repositories) do not name exactly the stored indexes
    with the MACs they were committed with (``macs``: from :func:`_scan_indexes`)."""
    bad = []
    keyless = isinstance(repo.codec, MissingKeyCodec)
    for p in cat.restore_points(complete=True):
        try:
            try:
                doc = repo.read_metadata(p)
            except PassphraseRequired:
                if keyless:
                    continue  # check without the key: the sealed document cannot be read
                raise
            named = {v: d.get("index") for v, d in named_disks(doc, p.json_key).items()}
            if repo.keys is not None:
                repo.point_disks(p, doc)
                for d in named_disks(doc, p.json_key).values():
                    got = (macs or {}).get(d.get("index"))
                    if macs is not None and got is not None and d.get("index_mac") != got.hex():
                        raise Tampered(
                            f"{d.get('index')}: not the index the restore point was committed "
                            f"with (replaced)"
                        )
        except NotFound:
            continue
        except (RepoError, ValueError, KeyError, TypeError) as exc:
            bad.append({"restore_point": p.id, "error": f"{p.json_key}: {exc}"})
            continue
        missing = [k for v, k in named.items() if p.disks.get(v) != k]
        if missing:
            bad.append({"restore_point": p.id, "error": f"missing index(es): {', '.join(missing)}"})
    return bad


def _read_all(repo, digests: list[bytes], concurrency: int, task) -> Iterator[tuple[bytes, str]]:
    """Read and decode chunks in a bounded pool; yields (digest, error) for each bad one."""
    lock = threading.Lock()
    total = [0]

    def one(d: bytes) -> str | None:
        try:
            obj = repo.read_chunk_object(d)[0]  # read again once before calling it damaged
        except NotFound:
            return "missing"
        except CorruptChunk as exc:
            return str(exc)
        with lock:
            total[0] += len(obj)
        return None

    with ThreadPoolExecutor(concurrency, thread_name_prefix="verify") as pool:
        it = iter(digests)
        running: dict[Any, bytes] = {}
        for d in it:
            running[pool.submit(one, d)] = d
            if len(running) >= 2 * concurrency:
                break
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                d = running.pop(fut)
                err = fut.result()
                task.advance()
                if err is not None:
                    yield d, err
                nxt = next(it, None)
                if nxt is not None:
                    running[pool.submit(one, nxt)] = nxt
    task.bytes_read = total[0]


def run_verify(
    repo: Repository,
    *,
    sample: float | None = None,
    concurrency: int = 8,
    ui: Progress | None = None,
    seed: int | None = None,
    mark: bool = False,
) -> dict[str, Any]:
    """``mark``: record each damaged or missing chunk as ``damaged/<digest>`` (the next backup
    producing it stores it again, ``fastpath repair`` fetches it from a copy) and clear the
    marks of checked chunks that are sound again."""
    ui = ui or Progress("quiet")
    cat = repo.scan()
    macs: dict[str, bytes] = {}
    unique, damaged_indexes, _short, _logical = _scan_indexes(repo, cat, ui, macs)
    digests = [r.tobytes() for r in unique]
    if sample is not None:
        if not 0 < sample <= 100:
            raise ValueError(f"--sample must be in (0, 100], not {sample}")
        rng = random.Random(seed)
        k = max(1, round(len(digests) * sample / 100)) if digests else 0
        digests = rng.sample(digests, k)
    bad: dict[bytes, str] = {}
    with ui.task("verify chunks", total=len(digests), unit="chunks") as t:
        for d, err in _read_all(repo, digests, concurrency, t):
            bad[d] = err
        t.done(f"{len(digests)} chunks read, {len(bad)} damaged")
    affected = _affected(repo, cat, set(bad))
    points_bad = _check_points(repo, cat, macs)
    for item in damaged_indexes:
        if item["restore_point"]:
            affected.setdefault(item["restore_point"], []).append(f"index {item['index']}")
    for item in points_bad:
        affected.setdefault(item["restore_point"], []).append(item["error"])
    marked = cleared = 0
    if mark:
        before = damaged_digests(repo.backend)
        for d, err in sorted(bad.items()):
            mark_damaged(repo.backend, d, err)
            marked += 1
        sound = (before & set(digests)) - set(bad)
        for d in sorted(sound):
            clear_mark(repo.backend, d)
        cleared = len(sound)
    ok = not bad and not damaged_indexes and not points_bad
    return {
        "ok": ok,
        "repo": repo.url,
        "restore_points": len(cat.restore_points(complete=True)),
        "indexes": len(cat.indexes),
        "chunks_referenced": int(len(unique)),
        "chunks_checked": len(digests),
        "bytes_read": getattr(t, "bytes_read", 0),
        "sample_percent": sample,
        "damaged_chunks": [
            {"digest": d.hex(), "key": chunk_key(d), "error": e} for d, e in sorted(bad.items())
        ],
        "damaged_indexes": damaged_indexes,
        "damaged_restore_points": points_bad,
        "affected_restore_points": dict(sorted(affected.items())),
        "marked": marked,
        "marks_cleared": cleared,
    }


def run_check(repo: Repository, *, ui: Progress | None = None) -> dict[str, Any]:
    ui = ui or Progress("quiet")
    cat = repo.scan()
    macs: dict[str, bytes] = {}
    unique, damaged_indexes, _short, _logical = _scan_indexes(repo, cat, ui, macs)
    present = set()
    with ui.task("list chunks", unit="chunks") as t:
        for info in repo.backend.list("chunks/"):
            try:
                present.add(digest_from_key(info.key))
            except ValueError:
                continue
            t.advance()
    missing = {r.tobytes() for r in unique} - present
    affected = _affected(repo, cat, missing)
    points_bad = _check_points(repo, cat, macs)
    for item in damaged_indexes:
        if item["restore_point"]:
            affected.setdefault(item["restore_point"], []).append(f"index {item['index']}")
    for item in points_bad:
        affected.setdefault(item["restore_point"], []).append(item["error"])
    return {
        "ok": not missing and not damaged_indexes and not points_bad,
        "repo": repo.url,
        "restore_points": len(cat.restore_points(complete=True)),
        "indexes": len(cat.indexes),
        "chunks_referenced": int(len(unique)),
        "chunks_present": len(present),
        "missing_chunks": sorted(d.hex() for d in missing),
        "damaged_indexes": damaged_indexes,
        "damaged_restore_points": points_bad,
        "affected_restore_points": dict(sorted(affected.items())),
    }


def repository_stats(repo: Repository, ui: Progress | None = None) -> dict[str, Any]:
    """Logical vs stored bytes, dedup and compression ratios, chunk counts."""
    ui = ui or Progress("quiet")
    cat = repo.scan()
    unique, damaged, short, logical = _scan_indexes(repo, cat, ui)
    referenced = {r.tobytes() for r in unique}
    stored_total = 0
    stored_ref = 0
    chunks = 0
    unreferenced = 0
    with ui.task("list chunks", unit="chunks") as t:
        for info in repo.backend.list("chunks/"):
            try:
                d = digest_from_key(info.key)
            except ValueError:
                continue
            chunks += 1
            stored_total += info.size
            if d in referenced:
                stored_ref += info.size
            else:
                unreferenced += 1
            t.advance()
    cs = repo.config.chunk_size
    unique_plain = sum(short.get(d, cs) for d in referenced)
    return {
        "encrypted": repo.config.encrypted,
        "compression": repo.config.compression,
        "vms": len({p.vm for p in cat.restore_points(complete=True)}),
        "restore_points": len(cat.restore_points(complete=True)),
        "indexes": len(cat.indexes),
        "damaged_indexes": len(damaged),
        "logical_bytes": logical,
        "unique_bytes": unique_plain,
        "stored_bytes": stored_total,
        "stored_referenced_bytes": stored_ref,
        "chunks": chunks,
        "chunks_referenced": len(referenced),
        "chunks_unreferenced": unreferenced,
        "dedup_ratio": round(logical / unique_plain, 3) if unique_plain else None,
        "compression_ratio": round(unique_plain / stored_ref, 3) if stored_ref else None,
        "total_ratio": round(logical / stored_total, 3) if stored_total else None,
    }


# -- CLI -----------------------------------------------------------------------------------------


def register(registry) -> None:
    p = registry.add("verify", cmd_verify, help="read and check every referenced chunk")
    add_repo_argument(p)
    p.add_argument(
        "--sample", type=float, metavar="P", help="check a random P percent of the chunks"
    )
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="parallel reads")
    p.add_argument(
        "--mark",
        action="store_true",
        help="record damaged chunks so that the next backup stores them again (heals)",
    )
    p.set_defaults(_render=_render)
    p = registry.add("check", cmd_check, help="check structure: indexes decode, chunks exist")
    add_repo_argument(p)
    p.set_defaults(_render=_render)


def cmd_verify(args: argparse.Namespace, ui: Progress):
    if args.sample is not None and not 0 < args.sample <= 100:
        raise UsageError(f"--sample must be in (0, 100], not {args.sample}")
    with open_repo(args) as repo:
        result = run_verify(
            repo, sample=args.sample, concurrency=args.concurrency, ui=ui, mark=args.mark
        )
    return result, 0 if result["ok"] else 1


def cmd_check(args: argparse.Namespace, ui: Progress):
    with open_repo(args, need_key=False) as repo:
        result = run_check(repo, ui=ui)
    return result, 0 if result["ok"] else 1


def _render(r: dict[str, Any]) -> str:
    lines = []
    for c in r.get("damaged_chunks", []):
        lines.append(f"damaged chunk {c['key']}: {c['error']}")
    for d in r.get("missing_chunks", []):
        lines.append(f"missing chunk {d}")
    for i in r["damaged_indexes"]:
        lines.append(f"damaged index {i['index']}: {i['error']}")
    for i in r["damaged_restore_points"]:
        lines.append(f"damaged restore point {i['restore_point']}: {i['error']}")
    for rp in r["affected_restore_points"]:
        lines.append(f"affected restore point {rp}")
    if r.get("marked"):
        lines.append(f"marked {r['marked']} damaged chunk(s): the next backup stores them again")
    checked = r.get("chunks_checked", r.get("chunks_referenced"))
    lines.append(
        f"{'OK' if r['ok'] else 'DAMAGED'}: {r['restore_points']} restore points, "
        f"{r['indexes']} indexes, {checked} chunks checked"
    )
    return "\n".join(lines)


__all__ = ["repository_stats", "run_check", "run_verify"]
