"""What ``fastpath list`` says of each restore point: VM name, time, full or incremental,
logical and stored size.

The facts come from the restore point documents (read through
:meth:`Repository.read_metadata`, in parallel: on S3 each one is a round trip): the VM's
``name_label`` (``metadata.vm``), each disk's base index (incremental when any disk has one),
the disks' virtual sizes (logical size), the bytes of chunk data written (``logical_bytes``
given to the writer) and the object bytes the point added to the repository (``stored``: new
chunks after compression/encryption; chunks shared with other points are counted where they
were first stored). An incomplete point (indexes without their document) shows what the listing
alone knows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from orchestrator.repo.catalog import parse_time
from orchestrator.repo.errors import RepoError


def describe_points(repo, points, concurrency: int = 16) -> list[dict[str, Any]]:
    def read(point):
        if not point.complete:
            return None, None
        try:
            return repo.read_metadata(point), None
        except RepoError as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="list") as pool:
        docs = list(pool.map(read, points))
    return [_row(p, doc, err) for p, (doc, err) in zip(points, docs)]


def _row(point, doc: dict | None, error: str | None) -> dict[str, Any]:
    import time

    row: dict[str, Any] = {
        "id": point.id,
        "vm": point.vm,
        "time": point.time,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(parse_time(point.time))),
        "complete": point.complete,
        "disks": dict(sorted(point.disks.items())),
        "vm_name": None,
        "kind": None,
        "logical_size": None,
        "data_bytes": None,
        "stored_bytes": None,
    }
    if error is not None:
        row["error"] = error
    if not doc:
        return row
    md = doc.get("metadata") or {}
    vm = md.get("vm") or {}
    disks = [d for d in doc.get("disks") or [] if isinstance(d, dict)]
    stats = doc.get("stats") or {}
    row["vm_name"] = vm.get("name_label") if isinstance(vm, dict) else None
    row["kind"] = "incremental" if any(d.get("base") for d in disks) else "full"
    row["logical_size"] = sum(int(d.get("virtual_size") or 0) for d in disks)
    row["data_bytes"] = stats.get("logical_bytes")
    row["stored_bytes"] = stats.get("bytes_written")
    return row


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(result: dict[str, Any]) -> str:
    rows = result["restore_points"]
    if not rows:
        return "no restore points"
    table = [("ID", "VM", "TIME", "KIND", "DISKS", "LOGICAL", "STORED")]
    for r in rows:
        table.append(
            (
                r["id"],
                r.get("vm_name") or "-",
                r["when"],
                r.get("kind") or ("incomplete" if not r["complete"] else "?"),
                str(len(r["disks"])),
                human(r.get("logical_size")),
                human(r.get("stored_bytes")),
            )
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table
    )
