"""Leases: time-limited locks kept in the repository itself, on a local directory as on S3.

Two kinds, both under ``locks/``:

- **Writer leases** (``locks/writers/<vm>.<time>.<token>.json``), one per running backup session.
  Shared: any number of writers run at once. GC reads them to learn which writers are alive and
  when the oldest one started (its sweep spares every chunk written after that), and deletes the
  pending indexes of writers whose lease is gone or expired.
- **Exclusive leases** (``locks/<name>/lease.<generation>``), e.g. the GC lease: at most one holder.
  Acquiring creates generation ``n + 1`` with a create-only write (``put_if_absent``), where ``n`` is
  the highest generation present; it is refused while generation ``n`` is alive. Two processes that
  race for the same generation cannot both win, and a holder whose lease expired (a stalled process)
  finds a higher generation when it checks, so taking over a dead holder needs no delete-then-create
  step that could let two holders in.

A lease body is JSON: kind, token, ttl, free-form info and who holds it: host, pid, the kernel's
boot id, the pid namespace, the process's start time (``/proc/<pid>/stat``, clock ticks since
boot) and its command line. Liveness is judged from the object's **backend mtime** (the S3
server's clock, the filesystem's clock) plus its ttl: a holder refreshes (rewrites) its lease from
a heartbeat thread every ttl/3, so a lease whose mtime is older than its ttl belongs to a dead or
stalled process. Readers compare with their own clock, so clocks must agree to within the margins
the callers use (NTP; documented in GC).

A lease is also dead at once, before its ttl, when its holder provably is: same host name, same
boot, same pid namespace as the reader, and no process with that pid and start time (gone, a
zombie, or the pid reused by another process). Anything else (another machine, another
container, a body without these fields) waits for the ttl: a lease is never declared dead on a
guess. A lease belongs to the process that took it: never hand one to a forked child (its pid
is not the one recorded).

A holder that cannot refresh its lease in time considers it lost (:meth:`Lease.check` raises
:class:`LeaseLost`); critical steps (a GC delete batch, a writer's commit) call ``check`` first.
There is an unavoidable window between a check and the action it guards (a process paused right
there): the check requires a remaining lifetime (``margin``) much larger than one action takes.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from orchestrator.repo.backends.base import Backend
from orchestrator.repo.errors import NotFound, RepoError

LOCKS_PREFIX = "locks/"
WRITERS_PREFIX = "locks/writers/"
DEFAULT_TTL = 300.0


class LeaseError(RepoError):
    """A lease could not be taken or kept."""


class LeaseBusy(LeaseError):
    """An exclusive lease is held by another live process."""


class LeaseLost(LeaseError):
    """This process's lease expired (heartbeat too late) or was taken over."""


@dataclass
class LeaseInfo:
    """A lease as read from the repository."""

    key: str
    mtime: float  # backend clock
    body: dict[str, Any]

    @property
    def ttl(self) -> float:
        try:
            return float(self.body.get("ttl", DEFAULT_TTL))
        except (TypeError, ValueError):
            return DEFAULT_TTL

    @property
    def token(self) -> str:
        return str(self.body.get("token", ""))

    def expires_in(self, now: float | None = None) -> float:
        """Seconds until the ttl runs out unless the holder refreshes (negative: expired)."""
        return self.mtime + self.ttl - (time.time() if now is None else now)

    def dead_reason(self, now: float | None = None) -> str | None:
        """Why this lease is dead (ttl run out, or its holder provably gone), or None."""
        left = self.expires_in(now)
        if left < 0:
            return f"expired {-left:.0f} s ago"
        return holder_gone(self.body)

    def expired(self, now: float | None = None) -> bool:
        """True when the lease is dead: its ttl ran out, or its holder provably is gone."""
        return self.dead_reason(now) is not None

    def holder(self) -> str:
        """Who holds it, for messages: host, pid and command."""
        return describe_holder(self.body)

    @property
    def started(self) -> float:
        """Backend time at which the lease was first written (its holder's start)."""
        try:
            return float(self.body.get("started", self.mtime))
        except (TypeError, ValueError):
            return self.mtime


def _decode_body(key: str, data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {"corrupt": True}
    return body if isinstance(body, dict) else {"corrupt": True}


def read_lease(backend: Backend, key: str) -> LeaseInfo | None:
    """The lease at ``key`` or None if it vanished. A body that is not JSON counts as a lease
    with the default ttl (a torn write cannot happen, but a foreign file might)."""
    try:
        info = backend.stat(key)
        data = backend.get(key)
    except NotFound:
        return None
    return LeaseInfo(key, info.mtime, _decode_body(key, data))


def list_writer_leases(backend: Backend) -> list[LeaseInfo]:
    """Every writer lease, live or expired."""
    out = []
    for info in backend.list(WRITERS_PREFIX):
        if not info.key.endswith(".json"):
            continue
        try:
            data = backend.get(info.key)
        except NotFound:
            continue
        out.append(LeaseInfo(info.key, info.mtime, _decode_body(info.key, data)))
    return out


@dataclass
class Lease:
    """A lease held by this process. Use as a context manager or call :meth:`release`."""

    backend: Backend
    key: str
    ttl: float
    body: dict[str, Any]
    started: float = 0.0  # backend mtime of the first write
    _last_ok: float = 0.0  # local monotonic time of the last successful write
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    verify: Callable[[], str | None] | None = None  # returns a reason when the lease was lost

    @property
    def token(self) -> str:
        return self.body["token"]

    def _encode(self) -> bytes:
        return json.dumps(self.body, sort_keys=True).encode()

    def refresh(self) -> None:
        """Rewrite the lease now (new mtime). Raises LeaseLost if it was lost meanwhile."""
        with self._lock:
            self._raise_if_lost()
            if self.remaining() <= 0:
                # never revive an expired lease: another process may already hold it
                self._lost = f"expired before it could be refreshed (ttl {self.ttl:.1f} s)"
                self._raise_if_lost()
            before = time.monotonic()
            self.backend.put(self.key, self._encode())
            if self.verify is not None:
                reason = self.verify()
                if reason:
                    self._lost = reason
                    self._raise_if_lost()
            self._last_ok = before

    def remaining(self) -> float:
        """Seconds of guaranteed lifetime left (from the last successful refresh)."""
        if self._lost:
            return 0.0
        return self._last_ok + self.ttl - time.monotonic()

    def _raise_if_lost(self) -> None:
        if self._lost:
            raise LeaseLost(f"lease {self.key} lost: {self._lost}")

    def check(self, margin: float | None = None) -> None:
        """Raise LeaseLost unless at least ``margin`` seconds (default ttl/3) of life remain."""
        self._raise_if_lost()
        need = self.ttl / 3 if margin is None else margin
        if self.remaining() < need:
            self._lost = f"not refreshed for more than {self.ttl - need:.1f} s"
            self._raise_if_lost()

    def start_heartbeat(self, interval: float | None = None) -> None:
        """Refresh from a daemon thread every ttl/3 until released."""
        if self._thread is not None:
            return
        every = self.ttl / 3 if interval is None else interval

        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    self.refresh()
                except LeaseLost:
                    return
                except RepoError:
                    # keep trying: check() reports the lease lost once its lifetime is used up
                    continue

        self._thread = threading.Thread(target=beat, name=f"lease {self.key}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease (best effort: an expired lease is harmless)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            if not self._lost:
                self._lost = "released"
                try:
                    self.backend.delete(self.key)
                except RepoError:
                    pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- who holds a lease, and whether that process still exists ----------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def process_start(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of ``pid``, None if no such
    process (or no /proc). Field 22 of /proc/<pid>/stat; the command name in parentheses may
    hold spaces and parentheses, so the fields are counted from its last ')'."""
    text = _read_text(f"/proc/{int(pid)}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    try:
        return int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


@cache
def _this_machine() -> dict[str, str]:
    """Host name, boot id and pid namespace of this process (empty values when unknown)."""
    boot = (_read_text("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot": boot, "pidns": pidns}


_SECRET_OPTIONS = ("password", "passphrase", "secret", "token", "key")


def _redacted(args: list[str]) -> list[str]:
    """``args`` with the values of secret-looking options masked: the command is stored in the
    repository (``--password`` still works, with a warning)."""
    out: list[str] = []
    hide = False
    for arg in args:
        if hide:
            out.append("***")
            hide = False
            continue
        name, eq, _value = arg.partition("=")
        secret = arg.startswith("--") and any(w in name.lower() for w in _SECRET_OPTIONS)
        if secret and eq:
            out.append(f"{name}=***")
        else:
            out.append(arg)
            hide = secret
    return out


def holder_identity() -> dict[str, Any]:
    """The fields that name this process in a lease body."""
    me = _this_machine()
    pid = os.getpid()
    started = process_start(pid)
    cmd = " ".join([os.path.basename(sys.argv[0] or "python"), *_redacted(sys.argv[1:])])
    return {
        "host": me["host"],
        "pid": pid,
        "boot": me["boot"],
        "pidns": me["pidns"],
        "pid_start": started[0] if started else None,
        "cmd": cmd if len(cmd) <= 160 else cmd[:157] + "...",
    }


def holder_gone(body: dict[str, Any]) -> str | None:
    """A reason when the holder named by ``body`` provably no longer runs, else None.

    Only judged for a holder on this very machine and pid namespace (same host name, boot id
    and pid namespace): then its pid must exist, not be a zombie, and have the recorded start
    time (otherwise the pid was reused). Elsewhere, with fields missing, or when /proc does
    not show a process the kernel says exists, None: the ttl decides. A wrong "gone" would let
    GC treat a running backup as dead, so every doubt counts as alive."""
    me = _this_machine()
    if not me["boot"] or not me["pidns"]:
        return None
    if (body.get("host"), body.get("boot"), body.get("pidns")) != (
        me["host"],
        me["boot"],
        me["pidns"],
    ):
        return None
    pid, start = body.get("pid"), body.get("pid_start")
    if not isinstance(pid, int) or not isinstance(start, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # asks the kernel, whatever /proc shows (hidepid hides other users')
    except ProcessLookupError:
        return f"its holder pid {pid} on {me['host']} is gone"
    except PermissionError:
        pass  # it exists, under another user
    now = process_start(pid)
    if now is None:
        return None  # it exists but /proc does not show it: cannot tell, the ttl decides
    if now[1] in ("Z", "X"):
        return f"its holder pid {pid} on {me['host']} has exited"
    if now[0] != start:
        return f"its holder pid {pid} on {me['host']} is gone (the pid now names another process)"
    return None


def describe_holder(body: dict[str, Any]) -> str:
    text = f"host {body.get('host', '?')} pid {body.get('pid', '?')}"
    if body.get("cmd"):
        text += f" ({body['cmd']})"
    return text


def _new_body(kind: str, ttl: float, info: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "kind": kind,
        "token": secrets.token_hex(8),
        **holder_identity(),
        "ttl": ttl,
        "created": time.time(),
        "info": info or {},
    }


def acquire_writer_lease(
    backend: Backend,
    name: str,
    *,
    ttl: float = DEFAULT_TTL,
    info: dict[str, Any] | None = None,
    heartbeat: bool = True,
) -> Lease:
    """A shared writer lease named ``locks/writers/<name>.<token>.json``; ``started`` is the
    backend's mtime of the first write (the same clock as chunk mtimes)."""
    body = _new_body("writer", ttl, info)
    key = f"{WRITERS_PREFIX}{name}.{body['token']}.json"
    lease = Lease(backend, key, ttl, body)
    before = time.monotonic()
    if not backend.put_if_absent(key, lease._encode()):
        raise LeaseError(f"writer lease {key} already exists")
    lease._last_ok = before
    lease.started = backend.stat(key).mtime
    lease.body["started"] = lease.started
    if heartbeat:
        lease.start_heartbeat()
    return lease


def _generations(backend: Backend, prefix: str) -> list[tuple[int, str]]:
    out = []
    for info in backend.list(prefix):
        name = info.key[len(prefix) :]
        if name.startswith("lease.") and name[6:].isdigit():
            out.append((int(name[6:]), info.key))
    out.sort()
    return out


def current_exclusive(backend: Backend, name: str) -> LeaseInfo | None:
    """The live holder of exclusive lease ``name``, or None."""
    prefix = f"{LOCKS_PREFIX}{name}/"
    gens = _generations(backend, prefix)
    if not gens:
        return None
    held = read_lease(backend, gens[-1][1])
    if held is None or held.expired():
        return None
    return held


def acquire_exclusive(
    backend: Backend,
    name: str,
    *,
    ttl: float = DEFAULT_TTL,
    info: dict[str, Any] | None = None,
    heartbeat: bool = True,
    attempts: int = 5,
) -> Lease:
    """Take exclusive lease ``name`` (e.g. "gc"). LeaseBusy if a live process holds it."""
    prefix = f"{LOCKS_PREFIX}{name}/"
    for _ in range(attempts):
        gens = _generations(backend, prefix)
        top = gens[-1][0] if gens else 0
        if gens:
            held = read_lease(backend, gens[-1][1])
            if held is not None and not held.expired():
                raise LeaseBusy(
                    f"{name} lease held by {held.holder()} ({gens[-1][1]}, expires in "
                    f"{held.expires_in():.0f} s unless its holder renews it)"
                )
        key = f"{prefix}lease.{top + 1:010d}"
        body = _new_body(name, ttl, info)
        lease = Lease(backend, key, ttl, body)
        before = time.monotonic()
        if not backend.put_if_absent(key, lease._encode()):
            continue  # another process won this generation: look again
        lease._last_ok = before
        lease.started = backend.stat(key).mtime
        lease.body["started"] = lease.started

        def verify(lease: Lease = lease, prefix: str = prefix) -> str | None:
            gens = _generations(lease.backend, prefix)
            if not gens or gens[-1][1] != lease.key:
                return "taken over by a newer generation"
            return None

        lease.verify = verify
        # older generations are dead: remove them (best effort, never needed for correctness)
        stale = [k for _, k in gens]
        if stale:
            try:
                backend.delete_many(stale)
            except RepoError:
                pass
        if heartbeat:
            lease.start_heartbeat()
        return lease
    raise LeaseBusy(f"{name} lease: lost the race {attempts} times, another process is taking it")


__all__ = [
    "DEFAULT_TTL",
    "Lease",
    "LeaseBusy",
    "LeaseError",
    "LeaseInfo",
    "LeaseLost",
    "acquire_exclusive",
    "acquire_writer_lease",
    "current_exclusive",
    "describe_holder",
    "holder_gone",
    "holder_identity",
    "list_writer_leases",
    "read_lease",
]
