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

import base64
import calendar
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from orchestrator.repo.backends import Backend
from orchestrator.repo.errors import NotFound, PassphraseRequired, RepoError, Tampered
from orchestrator.repo.keys import MetadataKeys

BACKUPS = "backups/"
RP_FORMAT = "xcp-fastpath-restore-point"
SEALED_RP_FORMAT = "xcp-fastpath-sealed-restore-point"
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


def parse_index_key(key: str) -> tuple[str, str, str]:
    """(vm, vdi, time) of ``backups/<vm>/<vdi>/<time>.index`` (or ``.pending``); ValueError."""
    parts = key[len(BACKUPS) :].split("/") if key.startswith(BACKUPS) else []
    if len(parts) == 3:
        stem, dot, suffix = parts[2].rpartition(".")
        if dot and suffix in ("index", "pending") and _TIME_RE.match(stem):
            return check_name("VM", parts[0]), check_name("VDI", parts[1]), stem
    raise ValueError(f"not an index key: {key!r}")


def index_binding(vm: str, vdi: str, when: str) -> bytes:
    """What a keyed index is bound to (orchestrator.repo.index): where it is stored."""
    return f"xcp-fastpath index v2 vm={vm} vdi={vdi} time={when}".encode()


def point_binding(vm: str, when: str) -> bytes:
    """The associated data of a sealed restore point document."""
    return f"xcp-fastpath restore point v1 vm={vm} time={when}".encode()


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


def encode_point_document(doc: dict[str, Any], keys: MetadataKeys | None = None) -> bytes:
    """The bytes of ``backups/<vm>/<time>.json`` (``doc`` carries ``"format": RP_FORMAT``).
    With ``keys`` (an authenticated encrypted repository): sealed with AES-256-GCM, bound to the
    document's VM and time, inside a small JSON envelope."""
    plain = json.dumps(doc, indent=1, sort_keys=True).encode()
    if keys is None:
        return plain
    sealed = keys.seal(point_binding(doc["vm"], doc["time"]), plain)
    envelope = {
        "format": SEALED_RP_FORMAT,
        "version": 1,
        "cipher": "aes-256-gcm",
        "sealed": base64.b64encode(sealed).decode(),
    }
    return json.dumps(envelope, sort_keys=True).encode()


def decode_point_document(
    data: bytes,
    where: str,
    *,
    vm: str | None = None,
    when: str | None = None,
    keys: MetadataKeys | None = None,
    need_auth: bool = False,
) -> dict[str, Any]:
    """A restore point document; RepoError naming ``where`` if it is not one. A sealed one is
    opened with ``keys`` (PassphraseRequired without them; Tampered if it fails authentication
    or names another VM or time); ``need_auth``: a plain one is refused (Tampered)."""
    doc = _json_object(data, where)
    if doc.get("format") == SEALED_RP_FORMAT:
        if doc.get("version") != 1 or doc.get("cipher") != "aes-256-gcm":
            raise RepoError(f"{where}: unknown sealed restore point version or cipher")
        if keys is None:
            raise PassphraseRequired(
                f"{where}: restore point documents of this repository are encrypted: this "
                f"needs its passphrase (FASTPATH_PASSPHRASE or --passphrase-file)"
            )
        if vm is None or when is None:
            raise ValueError("a sealed restore point needs its VM and time")
        try:
            sealed = base64.b64decode(doc.get("sealed") or "", validate=True)
        except ValueError:
            raise Tampered(f"{where}: sealed restore point is not base64") from None
        doc = _json_object(keys.open(point_binding(vm, when), sealed, where), where)
        if doc.get("format") != RP_FORMAT:
            raise Tampered(f"{where}: sealed object is not a restore point document")
        if doc.get("vm") != vm or doc.get("time") != when:
            raise Tampered(f"{where}: document of {doc.get('id')!r} stored as {vm}/{when}")
        return doc
    if doc.get("format") != RP_FORMAT:
        raise RepoError(f"{where}: not a restore point document")
    if need_auth:
        raise Tampered(
            f"{where}: unauthenticated (plain) restore point document in an encrypted repository"
        )
    return doc


def _json_object(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        raise RepoError(f"{where}: not JSON") from None
    if not isinstance(doc, dict):
        raise RepoError(f"{where}: not a restore point document")
    return doc


def named_disks(doc: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """vdi -> disk entry of a restore point document (RepoError if malformed)."""
    disks = doc.get("disks")
    if not isinstance(disks, list) or not all(
        isinstance(d, dict) and isinstance(d.get("vdi"), str) for d in disks
    ):
        raise RepoError(f"{where}: malformed disk list")
    return {d["vdi"]: d for d in disks}
