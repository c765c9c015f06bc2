"""agent.slots (sans-IO): who gets a connection slot and whom a newcomer displaces."""

from agent.slots import Budget, Slots


def admit(slots, addr):
    slot, victims = slots.admit(addr)
    return slot, [v.seq for v in victims]


def test_per_address_budget_displaces_that_address_oldest():
    slots = Slots(Budget(max_connections=10, max_unauthenticated=6, max_per_address=2))
    a1, _ = admit(slots, "a")
    a2, _ = admit(slots, "a")
    b1, _ = admit(slots, "b")
    a3, victims = admit(slots, "a")
    assert a3 is not None and victims == [a1.seq] and a1.evicted and not b1.evicted
    assert slots.counts() == {"open": 3, "unauthenticated": 3}


def test_busy_pre_ticket_connections_are_never_displaced():
    slots = Slots(Budget(max_connections=10, max_unauthenticated=4, max_per_address=2))
    a1, _ = admit(slots, "a")
    a2, _ = admit(slots, "a")
    assert slots.set_waiting(a1, False) and slots.set_waiting(a2, False)
    slot, victims = admit(slots, "a")
    assert slot is None and victims == []
    assert admit(slots, "b")[0] is not None  # another address still gets in


def test_ticket_holders_leave_the_pre_ticket_budget_and_idle_ones_go_last():
    slots = Slots(Budget(max_connections=3, max_unauthenticated=3, max_per_address=3))
    t, _ = admit(slots, "a")
    slots.authenticate(t)  # an idle keep-alive ticket holder
    p1, _ = admit(slots, "b")
    p2, _ = admit(slots, "c")
    slot, victims = admit(slots, "d")
    assert slot is not None and victims == [p1.seq]  # a pre-ticket one goes first
    slots.set_waiting(p2, False)
    s2, _ = admit(slots, "e")
    assert s2 is not None and not p2.evicted  # now only idle: the ticket holder or the newest
    assert slots.set_waiting(p2, True)


def test_without_idle_eviction_of_ticket_holders_a_full_server_refuses():
    slots = Slots(Budget(max_connections=2, max_unauthenticated=2, evict_idle_authenticated=False))
    for addr in ("a", "b"):
        s, _ = admit(slots, addr)
        slots.authenticate(s)
    assert admit(slots, "c") == (None, [])


def test_an_evicted_connection_learns_it_when_it_next_waits_or_works():
    slots = Slots(Budget(max_connections=1, max_unauthenticated=1, max_per_address=1))
    first, _ = admit(slots, "a")
    second, victims = admit(slots, "a")
    assert victims == [first.seq]
    assert slots.set_waiting(first, False) is False
    slots.release(first)  # releasing a displaced slot twice is harmless
    assert slots.counts()["open"] == 1
