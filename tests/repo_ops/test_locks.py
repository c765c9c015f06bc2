"""Leases on the repository backend: writer leases, exclusive leases, expiry and take-over."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.repo import locks
from orchestrator.repo.backends import open_backend


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        b = open_backend(tmp_path / "r")
    else:
        from tests.fixtures.s3 import fast_retry

        b = open_backend(request.getfixturevalue("s3_env").url, retry=fast_retry())
    yield b
    b.close()


def test_writer_leases_are_listed_and_released(backend):
    a = locks.acquire_writer_lease(backend, "vm1.t1", info={"vm": "vm1"}, heartbeat=False)
    b = locks.acquire_writer_lease(backend, "vm2.t2", info={"vm": "vm2"}, heartbeat=False)
    found = {lease.body["info"]["vm"]: lease for lease in locks.list_writer_leases(backend)}
    assert set(found) == {"vm1", "vm2"}
    assert not found["vm1"].expired()
    assert found["vm1"].started == pytest.approx(a.started)
    a.release()
    assert [lease.body["info"]["vm"] for lease in locks.list_writer_leases(backend)] == ["vm2"]
    b.release()
    assert locks.list_writer_leases(backend) == []


def test_exclusive_lease_is_exclusive_and_released(backend):
    first = locks.acquire_exclusive(backend, "gc", heartbeat=False)
    with pytest.raises(locks.LeaseBusy, match="gc lease held"):
        locks.acquire_exclusive(backend, "gc", heartbeat=False)
    assert locks.current_exclusive(backend, "gc").token == first.token
    first.release()
    assert locks.current_exclusive(backend, "gc") is None
    second = locks.acquire_exclusive(backend, "gc", heartbeat=False)
    second.release()


def test_expired_exclusive_lease_is_taken_over_and_the_old_holder_loses(tmp_path):
    backend = open_backend(tmp_path / "r")
    old = locks.acquire_exclusive(backend, "gc", ttl=0.3, heartbeat=False)
    time.sleep(0.4)  # the holder stalled longer than its ttl
    new = locks.acquire_exclusive(backend, "gc", ttl=30, heartbeat=False)
    with pytest.raises(locks.LeaseLost):
        old.check(margin=0)  # its own clock says it expired
    with pytest.raises(locks.LeaseLost):
        old.refresh()  # and it never revives itself
    new.check()
    assert locks.current_exclusive(backend, "gc").token == new.token
    new.release()


def test_a_refresh_that_finds_a_newer_generation_loses(tmp_path):
    backend = open_backend(tmp_path / "r")
    holder = locks.acquire_exclusive(backend, "gc", ttl=30, heartbeat=False)
    # another process took generation n+1 (e.g. it judged our lease expired by its clock)
    backend.put("locks/gc/lease.9999999999", b'{"token": "other", "ttl": 30}')
    with pytest.raises(locks.LeaseLost, match="newer generation"):
        holder.refresh()
    with pytest.raises(locks.LeaseLost):
        holder.check()


def test_only_one_of_many_racing_acquirers_wins(tmp_path):
    backend = open_backend(tmp_path / "r")
    winners, busy = [], []
    barrier = threading.Barrier(8)

    def race():
        barrier.wait()
        try:
            winners.append(locks.acquire_exclusive(backend, "gc", heartbeat=False))
        except locks.LeaseBusy:
            busy.append(1)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(winners) == 1 and len(busy) == 7


def test_heartbeat_keeps_a_lease_alive(tmp_path):
    backend = open_backend(tmp_path / "r")
    lease = locks.acquire_writer_lease(backend, "vm.t", ttl=3.0)
    try:
        time.sleep(6.5)  # more than twice the ttl: only the heartbeat keeps it alive
        lease.check(margin=0)
        (info,) = locks.list_writer_leases(backend)
        assert not info.expired()
    finally:
        lease.release()


def test_writer_lease_without_heartbeat_expires(tmp_path):
    backend = open_backend(tmp_path / "r")
    lease = locks.acquire_writer_lease(backend, "vm.t", ttl=0.2, heartbeat=False)
    time.sleep(0.3)
    (info,) = locks.list_writer_leases(backend)
    assert info.expired()
    with pytest.raises(locks.LeaseLost):
        lease.check(margin=0)


def test_garbage_lease_objects_do_not_break_listing(tmp_path):
    backend = open_backend(tmp_path / "r")
    backend.put("locks/writers/junk.json", b"\xff not json")
    backend.put("locks/gc/lease.0000000001", b"[]")
    (info,) = locks.list_writer_leases(backend)
    assert info.body == {"corrupt": True}
    held = locks.current_exclusive(backend, "gc")
    assert held is not None  # a fresh unknown body counts as held until it expires
