"""Prune: retention rules (pure, with fake times) and metadata-only deletion."""

from __future__ import annotations

import calendar
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.jobs.prune import RetentionPolicy, plan_prune, run_prune, select_keep
from orchestrator.repo.catalog import Catalog, RestorePoint, format_time
from tests.repo_ops.helpers import DiskModel, backup, restore

DAY = 86400.0


def ts(text: str) -> float:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M"))


def kept(times, **policy):
    keep = select_keep(times, RetentionPolicy(**policy))
    return sorted(keep)


def test_keep_last():
    times = [ts("2026-11-01 10:00") + i * 3600 for i in range(10)]
    assert kept(times, keep_last=3) == [7, 8, 9]
    assert kept(list(reversed(times)), keep_last=3) == [0, 1, 2]  # by time, not by position
    assert kept(times, keep_last=20) == list(range(10))


def test_keep_daily_keeps_the_newest_of_each_of_the_last_n_days():
    times = [
        ts("2026-11-01 01:00"),
        ts("2026-11-01 23:00"),  # newest of Nov 1
        ts("2026-11-03 05:00"),  # newest of Nov 3 (Nov 2 has none)
        ts("2026-11-04 00:30"),
        ts("2026-11-04 12:00"),  # newest of Nov 4
    ]
    assert kept(times, keep_daily=2) == [2, 4]
    assert kept(times, keep_daily=3) == [1, 2, 4]
    assert kept(times, keep_daily=10) == [1, 2, 4]


def test_keep_weekly_uses_iso_weeks():
    # 2026-11-01 is a Sunday (ISO week 44); Monday Nov 2 starts week 45
    times = [ts("2026-10-31 10:00"), ts("2026-11-01 10:00"), ts("2026-11-02 10:00")]
    assert kept(times, keep_weekly=1) == [2]
    assert kept(times, keep_weekly=2) == [1, 2]


def test_keep_monthly_and_hourly():
    times = [ts("2026-09-30 10:00"), ts("2026-10-15 10:00"), ts("2026-10-31 10:00")]
    assert kept(times, keep_monthly=2) == [0, 2]
    hours = [ts("2026-11-01 10:05"), ts("2026-11-01 10:55"), ts("2026-11-01 11:10")]
    assert kept(hours, keep_hourly=5) == [1, 2]


def test_keep_yearly_keeps_the_newest_of_each_of_the_last_n_years():
    times = [
        ts("2023-06-01 10:00"),
        ts("2024-01-01 00:00"),
        ts("2024-12-31 23:59"),  # newest of 2024
        ts("2025-03-01 10:00"),  # newest of 2025
        ts("2026-01-01 00:00"),
        ts("2026-11-30 10:00"),  # newest of 2026
    ]
    assert kept(times, keep_yearly=1) == [5]
    assert kept(times, keep_yearly=3) == [2, 3, 5]
    assert kept(times, keep_yearly=10) == [0, 2, 3, 5]
    assert RetentionPolicy(keep_yearly=2).to_json() == {"keep_yearly": 2}


def test_rules_are_a_union():
    times = [ts("2026-11-01 10:00") + i * DAY / 2 for i in range(20)]  # two per day
    last = set(kept(times, keep_last=2))
    daily = set(kept(times, keep_daily=4))
    assert set(kept(times, keep_last=2, keep_daily=4)) == last | daily
    assert last == {18, 19} and daily == {13, 15, 17, 19}


def test_a_policy_must_keep_something():
    with pytest.raises(ValueError, match="keep something"):
        RetentionPolicy()
    with pytest.raises(ValueError):
        RetentionPolicy(keep_last=-1)


def test_plan_is_per_vm_and_handles_incomplete_points():
    cat = Catalog()
    base = ts("2026-11-01 00:00")
    for vm in ("vm-a", "vm-b"):
        for i in range(4):
            when = format_time(base + i * 3600)
            cat.points[(vm, when)] = RestorePoint(
                vm, when, f"backups/{vm}/{when}.json", {"d": f"backups/{vm}/d/{when}.index"}
            )
    crashed = format_time(base - 7200)
    cat.points[("vm-a", crashed)] = RestorePoint("vm-a", crashed, None, {"d": "x.index"})
    running = format_time(base + 99999)
    cat.points[("vm-b", running)] = RestorePoint("vm-b", running, None, {"d": "y.index"})
    plan = plan_prune(cat, RetentionPolicy(keep_last=1), live_sessions={("vm-b", running)})
    assert sorted(p.id for p, _ in plan.keep) == [
        f"vm-a/{format_time(base + 3 * 3600)}",
        f"vm-b/{format_time(base + 3 * 3600)}",
    ]
    assert len(plan.delete) == 6
    assert [p.time for p in plan.incomplete] == [crashed]
    assert [p.time for p in plan.running] == [running]
    only_a = plan_prune(cat, RetentionPolicy(keep_last=1), vm="vm-a")
    assert {p.vm for p in only_a.delete} == {"vm-a"}


def test_prune_deletes_metadata_only(repo):
    """No chunk is read, written, copied or deleted; only JSON and index objects go."""
    vm = str(uuid.uuid4())
    disk = DiskModel(chunks=3, seed=1)
    keys = None
    for gen in range(4):
        disk.write_chunk(gen % 3, seed=gen + 10)
        _, keys = backup(repo, vm, [disk], bases=keys)
    chunks_before = {i.key for i in repo.backend.list("chunks/")}
    repo.backend.reset()
    report = run_prune(repo, RetentionPolicy(keep_last=1))
    assert len(report["deleted"]) == 3
    b = repo.backend
    assert b.count("copy") == 0
    for verb in ("put", "put_if_absent", "delete", "delete_many", "get", "exists"):
        assert b.count(verb, "chunks") == 0, verb
    assert b.count("put") == 0  # prune writes nothing at all
    deleted = [k for v, k in b.log if v in ("delete", "delete_many")]
    assert len(deleted) == 3 * 2 and all(k.startswith("backups/") for k in deleted)
    # JSON documents go before indexes (a half-done prune leaves "incomplete" points only)
    assert max(n for n, k in enumerate(deleted) if k.endswith(".json")) < min(
        n for n, k in enumerate(deleted) if k.endswith(".index")
    )
    assert {i.key for i in repo.backend.list("chunks/")} == chunks_before
    (point,) = repo.list_restore_points()
    assert restore(repo, point.disks[disk.vdi]) == bytes(disk.data)


def test_dry_run_deletes_nothing(repo):
    vm = str(uuid.uuid4())
    disk = DiskModel(chunks=1, seed=2)
    disk.write_chunk(0, seed=3)
    backup(repo, vm, [disk])
    backup(repo, vm, [disk])
    repo.backend.reset()
    report = run_prune(repo, RetentionPolicy(keep_last=1), dry_run=True)
    assert len(report["deleted"]) == 1
    assert repo.backend.count("delete") + repo.backend.count("delete_many") == 0
    assert len(repo.list_restore_points()) == 2


def test_incomplete_points_of_dead_writers_are_pruned(repo):
    vm = str(uuid.uuid4())
    disk = DiskModel(chunks=1, seed=4)
    disk.write_chunk(0, seed=5)
    backup(repo, vm, [disk])
    # a crashed backup: its index was committed, its JSON never written, its lease is gone
    s = repo.begin_backup(vm)
    w = s.disk_writer(disk.vdi, disk.vdi, disk.size)
    w.put_chunk(0, disk.chunk(0))
    w.commit()
    report = run_prune(repo, RetentionPolicy(keep_last=5))
    assert report["running"] == [s.id]  # its lease is alive: kept
    s.lease.release()  # the process died
    report = run_prune(repo, RetentionPolicy(keep_last=5))
    assert report["deleted_incomplete"] == [s.id]
    assert len(repo.list_restore_points(include_incomplete=True)) == 1


_times = st.lists(st.integers(1_700_000_000, 1_800_000_000), min_size=0, max_size=40)
_n = st.integers(0, 6)


@settings(max_examples=200, deadline=None)
@given(_times, _n, _n, _n, _n, _n)
def test_retention_properties(times, last, daily, weekly, monthly, yearly):
    if not (last or daily or weekly or monthly or yearly):
        return
    rules = {"daily": daily, "weekly": weekly, "monthly": monthly, "yearly": yearly}
    policy = RetentionPolicy(keep_last=last, **{f"keep_{r}": n for r, n in rules.items()})
    keep = select_keep(times, policy)
    order = sorted(range(len(times)), key=lambda i: times[i], reverse=True)
    if times:
        assert order[0] in keep  # the newest restore point always survives
    assert set(order[:last]) <= set(keep)  # keep-last N: the N newest
    for rule, n in rules.items():
        chosen = [i for i, reasons in keep.items() if rule in reasons]
        periods = {_period_of(rule, times[i]) for i in chosen}
        assert len(chosen) == len(periods) <= n  # one per period, at most N periods
        for i in chosen:  # and it is the newest of its period
            same = [
                j
                for j in range(len(times))
                if _period_of(rule, times[j]) == _period_of(rule, times[i])
            ]
            assert times[i] == max(times[j] for j in same)
    # adding a rule never deletes more (rules are a union)
    wider = RetentionPolicy(keep_last=last + 1, **{f"keep_{r}": n for r, n in rules.items()})
    assert set(keep) <= set(select_keep(times, wider))


def _period_of(rule, t):
    from orchestrator.jobs.prune import _period

    return _period(rule, t)
