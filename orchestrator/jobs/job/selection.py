"""Which VMs a job backs up, resolved through XAPI at each run (so a VM tagged since the last
run is picked up): ``vms`` (uuid or unique name-label), ``tags`` (any of them), ``pools =
"all"``, minus ``exclude``; and :func:`resolve_vm`, the uuid-or-name lookup that ``backup vm``
and ``restore`` share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.cliutil import CommandFailed, UsageError

UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


@dataclass
class SelectedVm:
    uuid: str
    name: str
    host: str  # uuid of the resident host ("" when halted: any host)
    why: str  # "vms", "tag:<t>", "pool"


def _real_vms(x) -> dict[str, dict]:
    """ref -> record of every VM that is not a snapshot, template or dom0."""
    out = {}
    for ref, rec in x.VM.get_all_records().items():
        if rec.get("is_a_snapshot") or rec.get("is_a_template") or rec.get("is_control_domain"):
            continue
        out[ref] = rec
    return out


def resolve_vm(x, key: str) -> str:
    """The uuid of the VM named ``key`` (a uuid, or a name-label that is unique).

    CommandFailed (one line) when no VM has that uuid or name, UsageError listing the matches
    when the name is not unique.
    """
    import XenAPI

    if UUID_RE.match(key):
        try:
            x.VM.get_by_uuid(key)
            return key.lower()
        except XenAPI.Failure:
            pass
    matches = [
        rec
        for rec in (x.VM.get_record(r) for r in x.VM.get_by_name_label(key))
        if not rec.get("is_a_snapshot") and not rec.get("is_a_template")
    ]
    if not matches:
        raise CommandFailed(f"no VM with uuid or name {key!r}")
    if len(matches) > 1:
        uuids = ", ".join(sorted(m["uuid"] for m in matches))
        raise UsageError(f"{len(matches)} VMs are named {key!r}: {uuids}; give the uuid")
    return matches[0]["uuid"]


def _host_uuid(x, ref: str, cache: dict[str, str]) -> str:
    if not ref or ref == "OpaqueRef:NULL":
        return ""
    if ref not in cache:
        try:
            cache[ref] = x.host.get_uuid(ref)
        except Exception:
            cache[ref] = ref
    return cache[ref]


def select_vms(x, job) -> tuple[list[SelectedVm], list[str]]:
    """(the VMs ``job`` selects now, sorted by name; warnings such as a tag matching
    nothing). CommandFailed when a VM named in ``vms`` does not exist (or is ambiguous)."""
    vms = _real_vms(x)
    by_uuid = {rec["uuid"]: (ref, rec) for ref, rec in vms.items()}
    chosen: dict[str, str] = {}
    warnings: list[str] = []
    for key in job.vms:
        if key in by_uuid:
            chosen.setdefault(key, "vms")
            continue
        named = [rec["uuid"] for rec in vms.values() if rec["name_label"] == key]
        if not named:
            raise CommandFailed(f"{job.path}: no VM with uuid or name {key!r}")
        if len(named) > 1:
            raise CommandFailed(
                f"{job.path}: {len(named)} VMs are named {key!r}: {', '.join(sorted(named))}"
            )
        chosen.setdefault(named[0], "vms")
    for tag in job.tags:
        hit = [rec["uuid"] for rec in vms.values() if tag in (rec.get("tags") or [])]
        if not hit:
            warnings.append(f"tag {tag!r} matches no VM")
        for u in hit:
            chosen.setdefault(u, f"tag:{tag}")
    if job.all_vms:
        for u in by_uuid:
            chosen.setdefault(u, "pool")
    excluded = set()
    for key in job.exclude:
        excluded.update(u for u, (_r, rec) in by_uuid.items() if key in (u, rec["name_label"]))
    hosts: dict[str, str] = {}
    out = []
    for u, why in chosen.items():
        if u in excluded:
            continue
        _ref, rec = by_uuid[u]
        host = _host_uuid(x, rec.get("resident_on", ""), hosts)
        out.append(SelectedVm(u, rec["name_label"], host, why))
    out.sort(key=lambda v: (v.name, v.uuid))
    return out, warnings
