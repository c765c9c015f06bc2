"""orchestrator/jobs/backup/routing.py: which host reads each disk (pure logic)."""

import threading

from orchestrator.jobs.backup.routing import Pbd, Router

A, B, C, M = "OpaqueRef:a", "OpaqueRef:b", "OpaqueRef:c", "OpaqueRef:master"
SHARED = [Pbd(A, True), Pbd(B, True), Pbd(C, True)]


def router():
    return Router(names={A: "hostA", B: "hostB", C: "hostC", M: "master"})


def test_local_sr_goes_to_its_pbds_host_whatever_the_residence():
    r = router()
    route = r.route([Pbd(B, True)], resident=A, fallback=M)
    assert route.host == B and route.alternatives == () and not route.shared
    assert "local SR of hostB" in route.why
    # halted VM: same
    assert r.route([Pbd(C, True)], resident=None, fallback=M).host == C
    # a detached PBD still names the only host that could read it
    detached = r.route([Pbd(C, False)], resident=C, fallback=M)
    assert detached.host == C and "not attached" in detached.why


def test_shared_sr_prefers_the_resident_host():
    r = router()
    for _ in range(3):  # however loaded it already is
        route = r.route(SHARED, resident=B, fallback=M)
        assert route.host == B and route.shared
        assert "resident on hostB" in route.why
    assert r.assigned == {B: 3}
    assert set(route.alternatives) == {A, C}


def test_shared_sr_without_residence_spreads_by_disks_assigned():
    r = router()
    r.route([Pbd(A, True)], resident=A, fallback=M)  # a local disk on A counts too
    got = [r.route(SHARED, resident=None, fallback=M).host for _ in range(5)]
    assert got == [B, C, A, B, C]
    assert r.assigned == {A: 2, B: 2, C: 2}
    assert "not running" in r.route(SHARED, resident=None, fallback=M).why


def test_shared_sr_not_attached_on_the_resident_host():
    r = router()
    pbds = [Pbd(A, True), Pbd(B, True), Pbd(C, False)]
    route = r.route(pbds, resident=C, fallback=M)
    assert route.host in (A, B) and "not attached on the VM's host hostC" in route.why
    assert C not in route.alternatives
    # a host with no PBD of the SR at all
    assert r.route([Pbd(A, True), Pbd(B, True)], resident=C, fallback=M).host in (A, B)


def test_hosts_without_agent_are_skipped_for_shared_srs_only():
    r = router()
    r.mark_unavailable(B, "XENAPI_MISSING_PLUGIN fastpath")
    route = r.route(SHARED, resident=B, fallback=M)
    assert route.host in (A, C) and B not in route.alternatives
    assert "hostB which has no agent (XENAPI_MISSING_PLUGIN fastpath)" in route.why
    # a local SR of that host: no other host can read it; the transport falls back
    assert r.route([Pbd(B, True)], resident=B, fallback=M).host == B
    # every attached host without an agent: still a route (the fallback happens later)
    r.mark_unavailable(A, "down")
    r.mark_unavailable(C, "down")
    assert r.route(SHARED, resident=None, fallback=M).host in (A, B, C)
    # the first reason is kept
    r.mark_unavailable(B, "other")
    assert r.unavailable[B] == "XENAPI_MISSING_PLUGIN fastpath"


def test_no_pbd_asks_the_master():
    route = router().route([], resident=A, fallback=M)
    assert route.host == M and "no PBD" in route.why


def test_moved_recounts():
    r = router()
    r.route(SHARED, resident=A, fallback=M)
    r.moved(A, C)
    assert r.assigned == {A: 0, C: 1}
    assert r.route(SHARED, resident=None, fallback=M).host == A


def test_concurrent_routes_count_every_disk():
    r = router()
    barrier = threading.Barrier(8)

    def work():
        barrier.wait()
        for _ in range(300):
            r.route(SHARED, resident=None, fallback=M)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.assigned.values()) == 2400
    assert max(r.assigned.values()) - min(r.assigned.values()) <= 1
