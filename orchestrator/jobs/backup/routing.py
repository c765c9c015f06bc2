"""Which host reads each disk: the pool's routing of plugin calls (pure logic, no XAPI here).

XAPI forwards ``host.call_plugin(host, ...)`` to the host named, and an agent serves only the
SRs mounted on its own host, so a ticket must be asked of a host that can read the VDI's SR:

- a local SR (one PBD) -> the host of that PBD (the only one that can read it);
- a shared SR (PBDs on several hosts) -> the VM's resident host when the SR is attached
  there (the data is already flowing through it), else the attached host with the fewest
  disks assigned so far (a halted VM, or one resident where the SR is not plugged): the load
  of a job spreads over the pool;
- a host known to have no agent (its plugin call failed) is skipped for a shared SR when
  another attached host remains; for a local SR there is no other host, the transport falls
  back (auto: the XAPI way) and the report says why.

A ``Router`` is shared by every VM of a job (thread-safe), so "fewest disks so far" and "no
agent there" hold across the job; ``backup vm`` alone makes one per command.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pbd:
    host: str  # host ref
    attached: bool


@dataclass(frozen=True)
class Route:
    """Where a disk's ticket is asked: ``host`` (a ref), then ``alternatives`` in order (other
    hosts that can read the SR, for a retry when ``host`` has no agent), and why."""

    host: str
    why: str
    alternatives: tuple[str, ...] = ()
    shared: bool = False


@dataclass
class Router:
    """Chooses the host of each disk (``route``), counting disks per host and remembering the
    hosts whose agent is unavailable (``mark_unavailable``)."""

    names: dict[str, str] = field(default_factory=dict)  # host ref -> name, for the reasons
    assigned: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # host ref -> why
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def name(self, host: str) -> str:
        return self.names.get(host, host)

    def route(self, pbds: list[Pbd], resident: str | None, fallback: str) -> Route:
        """The route of one disk whose SR has ``pbds``, of a VM resident on ``resident``
        (None or a null ref when halted); ``fallback`` (the master) when the SR has no PBD.
        Counts the disk against the chosen host."""
        with self.lock:
            r = self._route(pbds, resident, fallback)
            self.assigned[r.host] = self.assigned.get(r.host, 0) + 1
            return r

    def _route(self, pbds: list[Pbd], resident: str | None, fallback: str) -> Route:
        hosts = list(dict.fromkeys(p.host for p in pbds))
        if not hosts:
            return Route(fallback, f"the SR has no PBD: asking the master {self.name(fallback)}")
        if len(hosts) == 1:
            (host,) = hosts
            why = f"local SR of {self.name(host)}"
            if not any(p.attached for p in pbds):
                why += " (its PBD is not attached)"
            return Route(host, why)
        attached = [h for h in hosts if any(p.host == h and p.attached for p in pbds)]
        if not attached:
            host = self._least(hosts)
            return Route(host, "shared SR attached nowhere: " + self.name(host), shared=True)
        usable = [h for h in attached if h not in self.unavailable] or attached
        if resident in attached and resident in usable:
            host, why = resident, f"shared SR, VM resident on {self.name(resident)}"
        else:
            host = self._least(usable)
            if resident in attached:
                why = (
                    f"shared SR, VM resident on {self.name(resident)} which has no agent "
                    f"({self.unavailable[resident]}): least loaded attached host "
                    f"{self.name(host)}"
                )
            elif resident:
                why = (
                    f"shared SR not attached on the VM's host {self.name(resident)}: least "
                    f"loaded attached host {self.name(host)}"
                )
            else:
                why = f"shared SR, VM not running: least loaded attached host {self.name(host)}"
        others = [h for h in usable if h != host]
        others.sort(key=lambda h: (self.assigned.get(h, 0), usable.index(h)))
        return Route(host, why, tuple(others), shared=True)

    def _least(self, hosts: list[str]) -> str:
        """The host with the fewest disks assigned so far (the first of them on a tie)."""
        return min(hosts, key=lambda h: (self.assigned.get(h, 0), hosts.index(h)))

    def mark_unavailable(self, host: str, why: str) -> None:
        """``host``'s agent cannot open exports (no plugin, agent down): later shared-SR disks
        go elsewhere."""
        with self.lock:
            self.unavailable.setdefault(host, why)

    def moved(self, old: str, new: str) -> None:
        """A disk first counted on ``old`` is read on ``new`` after all."""
        with self.lock:
            if self.assigned.get(old):
                self.assigned[old] -= 1
            self.assigned[new] = self.assigned.get(new, 0) + 1
