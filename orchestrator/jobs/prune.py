"""Prune: apply a retention policy by deleting restore points' metadata only.

A restore point is ``backups/<vm>/<time>.json`` plus one ``.index`` per disk. Pruning deletes
those objects (JSON first, so a half-pruned point is merely "incomplete") and nothing else: no
chunk is copied, rewritten or deleted here — every index is complete on its own (merge at
ingest), so dropping one costs metadata only, on S3 as on disk. Chunks no index references any
more are removed later by GC.

Retention (per VM, UTC calendar, like restic's ``forget``): the union of
- ``keep_last N``: the N newest restore points;
- ``keep_hourly/daily/weekly/monthly/yearly N``: for each of the N most recent hours / days /
  ISO weeks / months / years that have restore points, the newest restore point of that period.
Only complete restore points are counted and kept. Incomplete ones (indexes without their JSON:
a backup that crashed before its last step, or a half-pruned point) are deleted unless a live
writer lease says the backup is still running. The leases are listed after the catalogue scan:
a writer seen incomplete in the scan held its lease then, so at the listing it is either still
live (kept), dead (deleted), or finished — and then its JSON exists, which is checked again just
before deleting. A policy must keep something (at least one rule
>= 1), so prune can never empty a VM by mistake.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.cliutil import UsageError, add_repo_argument, open_repo
from orchestrator.progress import Progress

if TYPE_CHECKING:  # job files import RULES: the repository code loads when a prune runs
    from orchestrator.repo.catalog import Catalog, RestorePoint
    from orchestrator.repo.repository import Repository

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    def __post_init__(self) -> None:
        for rule in RULES:
            if getattr(self, f"keep_{rule}") < 0:
                raise ValueError(f"keep-{rule} must be >= 0")
        if not any(getattr(self, f"keep_{rule}") for rule in RULES):
            raise ValueError("a retention policy must keep something (e.g. --keep-last 1)")

    def to_json(self) -> dict[str, int]:
        return {
            f"keep_{r}": getattr(self, f"keep_{r}") for r in RULES if getattr(self, f"keep_{r}")
        }


def _period(rule: str, t: float) -> tuple[int, ...]:
    g = time.gmtime(t)
    if rule == "hourly":
        return (g.tm_year, g.tm_yday, g.tm_hour)
    if rule == "daily":
        return (g.tm_year, g.tm_yday)
    if rule == "weekly":
        iso = time.strftime("%G %V", g).split()
        return (int(iso[0]), int(iso[1]))
    if rule == "monthly":
        return (g.tm_year, g.tm_mon)
    if rule == "yearly":
        return (g.tm_year,)
    raise ValueError(rule)


def select_keep(times: Iterable[float], policy: RetentionPolicy) -> dict[int, list[str]]:
    """Pure retention logic: position (in ``times``) -> the rules that keep it.

    Positions not in the result are to be deleted.
    """
    items = sorted(enumerate(times), key=lambda it: it[1], reverse=True)  # newest first
    keep: dict[int, list[str]] = {}
    for pos, _ in items[: policy.keep_last]:
        keep.setdefault(pos, []).append("last")
    for rule in RULES[1:]:
        n = getattr(policy, f"keep_{rule}")
        if not n:
            continue
        seen: set[tuple[int, ...]] = set()
        for pos, t in items:
            p = _period(rule, t)
            if p in seen:
                continue
            if len(seen) == n:
                break
            seen.add(p)
            keep.setdefault(pos, []).append(rule)
    return keep


@dataclass
class PrunePlan:
    keep: list[tuple[RestorePoint, list[str]]] = field(default_factory=list)
    delete: list[RestorePoint] = field(default_factory=list)
    incomplete: list[RestorePoint] = field(default_factory=list)  # deleted too
    running: list[RestorePoint] = field(default_factory=list)  # incomplete but live: kept

    def keys(self) -> list[str]:
        out: list[str] = []
        for p in self.delete + self.incomplete:
            out.extend(p.keys())
        return out


def plan_prune(
    catalog: Catalog,
    policy: RetentionPolicy,
    *,
    vm: str | None = None,
    live_sessions: set[tuple[str, str]] = frozenset(),
) -> PrunePlan:
    plan = PrunePlan()
    by_vm: dict[str, list[RestorePoint]] = {}
    for p in catalog.restore_points(vm):
        if p.complete:
            by_vm.setdefault(p.vm, []).append(p)
        elif (p.vm, p.time) in live_sessions:
            plan.running.append(p)
        else:
            plan.incomplete.append(p)
    for points in by_vm.values():
        kept = select_keep([p.timestamp for p in points], policy)
        for pos, p in enumerate(points):
            if pos in kept:
                plan.keep.append((p, kept[pos]))
            else:
                plan.delete.append(p)
    return plan


def live_sessions(repo: Repository) -> set[tuple[str, str]]:
    from orchestrator.repo import locks

    out = set()
    for lease in locks.list_writer_leases(repo.backend):
        if not lease.expired():
            info = lease.body.get("info") or {}
            out.add((str(info.get("vm")), str(info.get("time"))))
    return out


def _still_incomplete(repo: Repository, point: RestorePoint) -> bool:
    """An incomplete point whose writer had no live lease when listed (after the scan) is dead,
    unless its writer finished in between: then its JSON exists now, and it is complete."""
    from orchestrator.repo.catalog import rp_key

    return not repo.backend.exists(rp_key(point.vm, point.time))


def run_prune(
    repo: Repository,
    policy: RetentionPolicy,
    *,
    vm: str | None = None,
    dry_run: bool = False,
    ui: Progress | None = None,
    catalog: Catalog | None = None,
    batch: int = 500,
    on_deleted: Callable[[RestorePoint], None] | None = None,
    live: set[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Delete the restore points the policy does not keep. Returns a JSON-able report."""
    ui = ui or Progress("quiet")
    cat = catalog or repo.scan()
    if live is None:
        live = live_sessions(repo)  # listed after the scan: see _still_incomplete
    plan = plan_prune(cat, policy, vm=vm, live_sessions=live)
    if plan.incomplete and not dry_run:
        plan.incomplete = [p for p in plan.incomplete if _still_incomplete(repo, p)]
    victims = plan.delete + plan.incomplete
    deleted_objects = 0
    if not dry_run and victims:
        with ui.task("prune", total=len(victims), unit="restore points") as task:
            # JSON documents first (the points disappear from `list` at once), then indexes.
            todo = list(victims)
            for start in range(0, len(todo), batch):
                group = todo[start : start + batch]
                json_keys = [p.json_key for p in group if p.json_key]
                index_keys = [k for p in group for k in sorted(p.disks.values())]
                if json_keys:
                    repo.backend.delete_many(json_keys)
                if index_keys:
                    repo.backend.delete_many(index_keys)
                deleted_objects += len(json_keys) + len(index_keys)
                for p in group:
                    if on_deleted is not None:
                        on_deleted(p)
                task.advance(len(group))
            task.done(f"{len(victims)} restore point(s), {deleted_objects} object(s) deleted")
    return {
        "ok": True,
        "repo": repo.url,
        "dry_run": dry_run,
        "policy": policy.to_json(),
        "vm": vm,
        "kept": [{"id": p.id, "reasons": r} for p, r in plan.keep],
        "deleted": [p.id for p in plan.delete],
        "deleted_incomplete": [p.id for p in plan.incomplete],
        "running": [p.id for p in plan.running],
        "objects_deleted": deleted_objects,
    }


# -- CLI -----------------------------------------------------------------------------------------


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    for rule in RULES:
        p.add_argument(
            f"--keep-{rule}", type=int, default=0, metavar="N", help=f"keep {rule} restore points"
        )


def policy_from_args(args: argparse.Namespace) -> RetentionPolicy:
    try:
        return RetentionPolicy(**{f"keep_{r}": getattr(args, f"keep_{r}") for r in RULES})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def register(registry) -> None:
    p = registry.add(
        "prune", cmd_prune, help="delete restore points by retention policy (metadata only)"
    )
    add_repo_argument(p)
    p.add_argument("--vm", metavar="UUID", help="only this VM")
    add_policy_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    p.set_defaults(_render=_render)


def cmd_prune(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    policy = policy_from_args(args)
    with open_repo(args, need_key=False) as repo:
        return run_prune(repo, policy, vm=args.vm, dry_run=args.dry_run, ui=ui)


def _render(result: dict[str, Any]) -> str:
    verb = "would delete" if result["dry_run"] else "deleted"
    lines = [f"keep   {k['id']}  ({', '.join(k['reasons'])})" for k in result["kept"]]
    lines += [f"{verb} {i}" for i in result["deleted"]]
    lines += [f"{verb} {i} (incomplete)" for i in result["deleted_incomplete"]]
    lines.append(
        f"{len(result['kept'])} kept, {len(result['deleted']) + len(result['deleted_incomplete'])} "
        f"{verb}, {result['objects_deleted']} object(s) deleted"
    )
    return "\n".join(lines)


__all__ = ["RetentionPolicy", "plan_prune", "run_prune", "select_keep"]
