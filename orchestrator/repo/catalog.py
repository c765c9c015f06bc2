"""The catalogue of a repository: what lives under ``backups/``, how it is named and listed.

Keys (docs/repository-format.md)::

    backups/<vm>/<time>.json           restore point: VM metadata; written after all its indexes
    backups/<vm>/<vdi>/<time>.index    one complete index per disk backup (the commit point)
    backups/<vm>/<vdi>/<time>.pending  an index being committed (orchestrator.repo.writer)

``<time>`` is UTC ``YYYYmmddTHHMMSS.ffffffZ``, shared by a session's indexes and its JSON; a
restore point's id is ``<vm>/<time>``; ``latest`` and ``<vm>/latest`` are accepted too
(:meth:`Catalog.resolve`).

Here: key names and times, :class:`RestorePoint` and :class:`Catalog` (one listing of
``backups/``, :func:`scan_backups`), the restore point document's (de)serialisation, and
:func:`fetch_many` (bulk GETs of indexes). The other prefixes are described where they are
written: ``chunks/`` in :mod:`orchestrator.repo.codec`, ``locks/`` in
:mod:`orchestrator.repo.locks` and :mod:`orchestrator.repo.deletions`, ``cache/`` in
:mod:`orchestrator.repo.dedup`, ``config`` and ``keys/`` in :mod:`orchestrator.repo.config`.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from orchestrator.repo.backends import Backend
from orchestrator.repo.errors import NotFound, RepoError

BACKUPS = "backups/"
RP_FORMAT = "xcp-fastpath-restore-point"
_TIME_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")
_UUIDISH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RestorePointNotFound(NotFound):
    pass


# -- time and keys -----------------------------------------------------------------------------


def format_time(epoch: float) -> str:
    seconds = int(epoch)
    micros = int(round((epoch - seconds) * 1e6))
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def parse_time(text: str) -> float:
    if not _TIME_RE.match(text):
        raise ValueError(f"not a restore point time: {text!r}")
    base = calendar.timegm(time.strptime(text[:15], "%Y%m%dT%H%M%S"))
    return base + int(text[16:22]) / 1e6


def check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _UUIDISH.match(value):
        raise ValueError(f"invalid {what} {value!r}")
    return value


def index_key(vm: str, vdi: str, when: str) -> str:
    return f"{BACKUPS}{vm}/{vdi}/{when}.index"


def pending_key(vm: str, vdi: str, when: str) -> str:
    return f"{BACKUPS}{vm}/{vdi}/{when}.pending"


def rp_key(vm: str, when: str) -> str:
    return f"{BACKUPS}{vm}/{when}.json"


@dataclass
class RestorePoint:
    vm: str
    time: str
    json_key: str | None = None  # None: incomplete (indexes without their JSON)
    disks: dict[str, str] = field(default_factory=dict)  # vdi -> index key

    @property
    def id(self) -> str:
        return f"{self.vm}/{self.time}"

    @property
    def complete(self) -> bool:
        return self.json_key is not None

    @property
    def timestamp(self) -> float:
        return parse_time(self.time)

    def keys(self) -> list[str]:
        """Every object of this restore point (JSON first: deleting it first hides the point)."""
        out = [self.json_key] if self.json_key else []
        return out + sorted(self.disks.values())


@dataclass
class Catalog:
    """One listing of ``backups/``."""

    points: dict[tuple[str, str], RestorePoint] = field(default_factory=dict)
    indexes: list[str] = field(default_factory=list)  # final index keys
    pending: list[tuple[str, str, str]] = field(default_factory=list)  # (key, vm, time)
    other: list[str] = field(default_factory=list)  # keys we do not recognise

    def restore_points(self, vm: str | None = None, complete: bool | None = None):
        out = [
            p
            for p in self.points.values()
            if (vm is None or p.vm == vm) and (complete is None or p.complete == complete)
        ]
        out.sort(key=lambda p: (p.vm, p.time))
        return out

    def resolve(self, ident: str, where: str) -> RestorePoint:
        """``<vm>/<time>``, ``<vm>/latest`` or ``latest`` (the newest restore point of all);
        ``where`` (the repository's URL) prefixes the error messages."""
        points = self.restore_points(complete=True)
        if ident == "latest":
            if not points:
                raise RestorePointNotFound(f"{where}: no restore point")
            return max(points, key=lambda p: (p.time, p.vm))
        vm, _, when = ident.rpartition("/")
        if not vm:
            raise RestorePointNotFound(
                f"{where}: bad restore point id {ident!r} (use <vm>/<time> or latest)"
            )
        if when == "latest":
            mine = [p for p in points if p.vm == vm]
            if not mine:
                raise RestorePointNotFound(f"{where}: no restore point for VM {vm}")
            return mine[-1]
        point = self.points.get((vm, when))
        if point is None or not point.complete:
            raise RestorePointNotFound(f"{where}: no restore point {ident}")
        return point


def scan_backups(backend: Backend) -> Catalog:
    cat = Catalog()
    for info in backend.list(BACKUPS):
        parts = info.key[len(BACKUPS) :].split("/")
        if len(parts) == 2 and parts[1].endswith(".json") and _TIME_RE.match(parts[1][:-5]):
            vm, when = parts[0], parts[1][:-5]
            point = cat.points.setdefault((vm, when), RestorePoint(vm, when))
            point.json_key = info.key
        elif len(parts) == 3 and parts[2].endswith(".index") and _TIME_RE.match(parts[2][:-6]):
            vm, vdi, when = parts[0], parts[1], parts[2][:-6]
            point = cat.points.setdefault((vm, when), RestorePoint(vm, when))
            point.disks[vdi] = info.key
            cat.indexes.append(info.key)
        elif len(parts) == 3 and parts[2].endswith(".pending") and _TIME_RE.match(parts[2][:-8]):
            cat.pending.append((info.key, parts[0], parts[2][:-8]))
        else:
            cat.other.append(info.key)
    cat.indexes.sort()
    return cat


def fetch_many(
    backend: Backend, keys: list[str], concurrency: int = 16
) -> Iterator[tuple[str, bytes | None]]:
    """GET many small objects (indexes) with at most ``concurrency`` requests in flight, in
    completion order; ``None`` for an object that vanished (pruned meanwhile). On S3 a GET costs
    a round trip, so reading thousands of indexes one by one would be latency-bound."""

    def one(key: str) -> tuple[str, bytes | None]:
        try:
            return key, backend.get(key)
        except NotFound:
            return key, None

    if concurrency <= 1 or len(keys) <= 1:
        for key in keys:
            yield one(key)
        return
    with ThreadPoolExecutor(concurrency, thread_name_prefix="fetch") as pool:
        todo = iter(keys)
        running = set()
        for key in todo:
            running.add(pool.submit(one, key))
            if len(running) >= 2 * concurrency:
                break
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
                nxt = next(todo, None)
                if nxt is not None:
                    running.add(pool.submit(one, nxt))


# -- restore point documents -------------------------------------------------------------------


def encode_point_document(doc: dict[str, Any]) -> bytes:
    """The bytes of ``backups/<vm>/<time>.json`` (``doc`` carries ``"format": RP_FORMAT``)."""
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def decode_point_document(data: bytes, where: str) -> dict[str, Any]:
    """A restore point document; RepoError naming ``where`` if it is not one."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise RepoError(f"{where}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != RP_FORMAT:
        raise RepoError(f"{where}: not a restore point document")
    return doc
