"""Connection slots of the HTTP and NBD servers: who gets in, and whom a newcomer displaces.

Sans-IO: Slots only keeps a table of Slot records and answers admit(); the servers (agent/http/
server.py, agent/nbd/server.py) close the victims it names and refuse what it refuses.

A connection starts unauthenticated ("pre-ticket": it has not presented a valid ticket yet) and
"waiting" (blocked on the client: first byte, TLS handshake, request head, keep-alive idle). The
budgets, all in Budget:

    max_connections       every slot; when full, the oldest waiting connection goes (pre-ticket
                          first, then, if evict_idle_authenticated, an idle keep-alive ticket
                          holder); none waiting: refused
    max_unauthenticated   pre-ticket connections; when full, the oldest waiting one goes
    max_per_address       pre-ticket connections from one source address; when full, that
                          address's oldest waiting one goes

So idle or silent connections can never shut a ticket holder out: a newcomer always displaces the
oldest of them, and a client that presents its ticket leaves the small pre-ticket budget. Only
connections busy serving a request are never displaced.
"""

import itertools
import threading


class Budget(object):
    def __init__(
        self,
        max_connections=64,
        max_unauthenticated=32,
        max_per_address=16,
        evict_idle_authenticated=True,
    ):
        self.max_connections = max_connections
        self.max_unauthenticated = max(1, min(max_unauthenticated, max_connections))
        self.max_per_address = max(1, min(max_per_address, self.max_unauthenticated))
        self.evict_idle_authenticated = evict_idle_authenticated


class Slot(object):
    """One admitted connection. `conn` is the server's own object (what it closes on eviction)."""

    __slots__ = ("address", "seq", "authenticated", "waiting", "evicted", "conn")

    def __init__(self, address, seq, conn=None):
        self.address = address
        self.seq = seq  # admission order: lower is older
        self.authenticated = False
        self.waiting = True
        self.evicted = False
        self.conn = conn


class Slots(object):
    """The table of admitted connections (thread-safe)."""

    def __init__(self, budget):
        self.budget = budget
        self._lock = threading.Lock()
        self._slots = set()
        self._seq = itertools.count()

    def __len__(self):
        with self._lock:
            return len(self._slots)

    def admit(self, address, conn=None):
        """(slot, victims): slot is None when refused; victims are slots to close (already marked
        evicted and out of the table)."""
        b = self.budget
        with self._lock:
            live = self._slots
            victims = []

            def evict(candidates):
                waiting = [s for s in candidates if s.waiting and s not in victims]
                if not waiting:
                    return False
                victim = min(waiting, key=lambda s: s.seq)
                victims.append(victim)
                return True

            pre = [s for s in live if not s.authenticated]
            mine = [s for s in pre if s.address == address]
            if len(mine) >= b.max_per_address and not evict(mine):
                return None, []
            if len(pre) - len(victims) >= b.max_unauthenticated and not evict(pre):
                return None, self._drop(victims)
            if len(live) - len(victims) >= b.max_connections:
                if not evict(pre):
                    idle = (
                        [s for s in live if s.authenticated] if b.evict_idle_authenticated else []
                    )
                    if not evict(idle):
                        return None, self._drop(victims)
            slot = Slot(address, next(self._seq), conn)
            live.add(slot)
            return slot, self._drop(victims)

    def _drop(self, victims):
        for v in victims:
            v.evicted = True
            self._slots.discard(v)
        return victims

    def release(self, slot):
        with self._lock:
            self._slots.discard(slot)

    def set_waiting(self, slot, waiting):
        """Mark the connection waiting on its client (evictable) or busy. False when it was
        evicted meanwhile: the connection must end."""
        with self._lock:
            if slot.evicted:
                return False
            slot.waiting = waiting
            return True

    def authenticate(self, slot):
        with self._lock:
            slot.authenticated = True

    def counts(self):
        with self._lock:
            pre = sum(1 for s in self._slots if not s.authenticated)
            return {"open": len(self._slots), "unauthenticated": pre}
