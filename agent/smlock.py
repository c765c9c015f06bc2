"""SM's locks, seen from outside SM: pausing the garbage collector of an SR while an export is open.

What SM does (xapi-project/sm, drivers/lock.py, flock.py, ipc.py, cleanup.py):

- Every SM lock is a file <lock dir>/<namespace>/<name> (lock dir /var/lock/sm; the namespace of an
  SR's locks is the SR uuid) locked with fcntl record locks (F_SETLK / F_SETLKW on the whole file,
  F_WRLCK): POSIX locks, what Python's fcntl.lockf takes.
- `sr` (/var/lock/sm/<sr>/sr) serialises SM's operations on the SR (snapshot, clone, delete, scan).
  SM holds it for a whole SM command; the GC takes it only briefly.
- `running` (/var/lock/sm/<sr>/running) is held by the GC process (cleanup.py) for as long as it
  collects or coalesces. `gc_active` only stops a second GC process from starting.
- To pause the GC, SM's own tools (cleanup.abort(), `cleanup.py -x`, gc_force) try the `running`
  lock; if the GC holds it they raise the IPC flag /var/run/sm/ipc/<sr>/abort (a file holding the
  pid; the GC polls it between and during coalesce steps, kills its coalesce child and releases
  `running`), retry the lock for a bounded time, clear the flag, and then hold `running` for as long
  as the GC must stay away. A GC started meanwhile finds `running` taken and exits.

This module does exactly that, with the directories configurable (tests, hostsim). Its limits:

- It only works where the GC runs. For shared SRs (NFS, iSCSI/HBA LVM) SM runs the GC on the pool
  master only, and its locks live in the master's local /var/lock/sm: an agent on another host
  cannot pause it. The chain checks of agent.export (see docs/consistency.md) are what protects
  those exports.
- POSIX record locks belong to the process, not to a file descriptor or thread: two threads of the
  agent never conflict, and closing ANY descriptor of the lock file drops the process's lock. So
  this module keeps one descriptor per lock file for the life of the hold, counts holders itself
  (several exports of one SR share one `running` hold), and nothing else in the agent may open
  these files.
- hostsim's simulated GC locks `running` with flock(2), which on Linux does not interact with POSIX
  locks. With flock_compat (the default) the agent takes an flock as well on the same descriptor:
  SM never flocks these files, so the extra lock is invisible to it and costs nothing.
"""

import errno
import fcntl
import logging
import os
import threading
import time

DEFAULT_LOCK_DIR = "/var/lock/sm"
DEFAULT_IPC_DIR = "/var/run/sm/ipc"
DEFAULT_ABORT_TIMEOUT = 60.0  # SM: SR.LOCK_RETRY_ATTEMPTS x SR.LOCK_RETRY_INTERVAL
DEFAULT_SR_LOCK_TIMEOUT = 10.0
POLL_INTERVAL = 0.1

RUNNING = "running"
SR_LOCK = "sr"
ABORT_FLAG = "abort"

log = logging.getLogger("fastpath.smlock")


class SMLockError(Exception):
    """A lock of SM could not be taken (names the SR and the lock file)."""


class GCBusy(SMLockError):
    """SM's GC holds `running` and did not let go after the abort request."""


class SRBusy(SMLockError):
    """Another SM operation held the `sr` lock longer than we are willing to wait."""


def _check_name(value, what):
    if not value or "/" in value or value.startswith(".") or "\0" in value:
        raise SMLockError("bad %s %r for a lock path" % (what, value))
    return value


def _try_lock(fd, flock_compat):
    """Take the POSIX lock (and the flock) without blocking; True when both are held."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    if flock_compat:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            if exc.errno in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                return False
            raise
    return True


def _unlock(fd, flock_compat):
    if flock_compat:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
    try:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    except OSError:
        pass


class _Held(object):
    """One lock file held by this process: its descriptor and the number of holders."""

    def __init__(self, path, fd):
        self.path = path
        self.fd = fd
        self.count = 0


class GCPause(object):
    """A hold on an SR's `running` lock; release() once (idempotent). A context manager."""

    def __init__(self, locks, sr_uuid):
        self._locks = locks
        self.sr_uuid = sr_uuid
        self._released = False

    def release(self):
        if not self._released:
            self._released = True
            self._locks._release_running(self.sr_uuid)

    close = release

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class SMLocks(object):
    """The agent's view of SM's lock directory; one instance per process (see the module notes).

    lock_dir: SM's lock directory. None disables locking (pause_gc/sr_locked do nothing); so does
    a lock_dir that does not exist: SM creates /var/lock/sm the first time it locks anything (an SR
    attach does at boot), so a host without it runs no SM GC. Per-SR directories are created as SM
    does.
    ipc_dir: SM's IPC flag directory (the abort flag).
    """

    def __init__(
        self,
        lock_dir=DEFAULT_LOCK_DIR,
        ipc_dir=DEFAULT_IPC_DIR,
        abort_timeout=DEFAULT_ABORT_TIMEOUT,
        sr_lock_timeout=DEFAULT_SR_LOCK_TIMEOUT,
        flock_compat=True,
        poll_interval=POLL_INTERVAL,
        clock=time.monotonic,
        sleep=time.sleep,
    ):
        self.lock_dir = lock_dir
        self.ipc_dir = ipc_dir
        self.abort_timeout = abort_timeout
        self.sr_lock_timeout = sr_lock_timeout
        self.flock_compat = flock_compat
        self.poll_interval = poll_interval
        self._clock = clock
        self._sleep = sleep
        self._mutex = threading.Lock()
        self._running = {}  # sr uuid -> _Held
        self._pending = {}  # sr uuid -> threading.Lock (one acquirer at a time per SR)
        self._sr_mutex = {}  # sr uuid -> threading.Lock (in-process exclusion for `sr`)
        self.aborts_requested = 0

    @property
    def enabled(self):
        return bool(self.lock_dir) and os.path.isdir(self.lock_dir)

    def path(self, sr_uuid, name):
        return os.path.join(
            self.lock_dir, _check_name(sr_uuid, "SR uuid"), _check_name(name, "lock name")
        )

    def _open(self, sr_uuid, name):
        path = self.path(sr_uuid, name)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise SMLockError("SR %s: cannot open SM lock %s: %s" % (sr_uuid, path, exc)) from exc
        return path, fd

    # -- GC pause (`running`) --------------------------------------------------------------------

    def is_gc_paused(self, sr_uuid):
        with self._mutex:
            held = self._running.get(sr_uuid)
            return held is not None and held.count > 0

    def pause_gc(self, sr_uuid, abort_timeout=None):
        """Hold SR's `running` lock (asking a running GC to abort first). Returns a GCPause.

        Raises GCBusy when the GC keeps the lock for more than abort_timeout seconds."""
        if not self.enabled:
            return GCPause(self, None)
        _check_name(sr_uuid, "SR uuid")
        with self._mutex:
            held = self._running.get(sr_uuid)
            if held is not None:
                held.count += 1
                return GCPause(self, sr_uuid)
            gate = self._pending.setdefault(sr_uuid, threading.Lock())
        with gate:
            with self._mutex:
                held = self._running.get(sr_uuid)
                if held is not None:  # another thread took it while we waited at the gate
                    held.count += 1
                    return GCPause(self, sr_uuid)
            held = self._acquire_running(sr_uuid, abort_timeout)
            with self._mutex:
                held.count = 1
                self._running[sr_uuid] = held
        return GCPause(self, sr_uuid)

    def _acquire_running(self, sr_uuid, abort_timeout):
        path, fd = self._open(sr_uuid, RUNNING)
        try:
            if _try_lock(fd, self.flock_compat):
                log.info("SR %s: GC paused (%s)", sr_uuid, path)
                return _Held(path, fd)
            # The GC is running: ask it to abort, as cleanup.abort() does, then retry for a while.
            flag = self._set_abort_flag(sr_uuid)
            try:
                timeout = self.abort_timeout if abort_timeout is None else abort_timeout
                deadline = self._clock() + timeout
                while True:
                    if _try_lock(fd, self.flock_compat):
                        log.info("SR %s: GC aborted and paused (%s)", sr_uuid, path)
                        return _Held(path, fd)
                    if self._clock() >= deadline:
                        raise GCBusy(
                            "SR %s: SM's garbage collector holds %s and did not abort within %gs"
                            % (sr_uuid, path, timeout)
                        )
                    self._sleep(self.poll_interval)
            finally:
                if flag is not None:
                    try:
                        os.unlink(flag)
                    except OSError:
                        pass
        except BaseException:
            os.close(fd)
            raise

    def _set_abort_flag(self, sr_uuid):
        """Raise SM's abort IPC flag; returns its path when we created it (we clear only our own)."""
        if not self.ipc_dir:
            return None
        d = os.path.join(self.ipc_dir, sr_uuid)
        flag = os.path.join(d, ABORT_FLAG)
        try:
            os.makedirs(d, exist_ok=True)
            fd = os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None  # someone else asked already (SM's soft abort); leave their flag alone
        except OSError as exc:
            log.warning("SR %s: cannot raise SM's abort flag %s: %s", sr_uuid, flag, exc)
            return None
        try:
            os.write(fd, ("%d\n" % os.getpid()).encode())
        finally:
            os.close(fd)
        self.aborts_requested += 1
        log.info("SR %s: asked SM's GC to abort (%s)", sr_uuid, flag)
        return flag

    def _release_running(self, sr_uuid):
        if sr_uuid is None:
            return
        with self._mutex:
            held = self._running.get(sr_uuid)
            if held is None:
                return
            held.count -= 1
            if held.count > 0:
                return
            del self._running[sr_uuid]
            # close() drops the POSIX lock too; unlock explicitly anyway (flock may be shared)
            _unlock(held.fd, self.flock_compat)
            os.close(held.fd)
        log.info("SR %s: GC resumed (%s)", sr_uuid, held.path)

    # -- `sr` lock (briefly) -----------------------------------------------------------------------

    def sr_locked(self, sr_uuid, timeout=None):
        """Context manager holding SR's `sr` lock (polling without blocking, up to `timeout`
        seconds, then SRBusy). Hold it only around short metadata work (opening a chain)."""
        return _SRLockContext(self, sr_uuid, self.sr_lock_timeout if timeout is None else timeout)


class _SRLockContext(object):
    def __init__(self, locks, sr_uuid, timeout):
        self.locks = locks
        self.sr_uuid = sr_uuid
        self.timeout = timeout
        self._fd = None
        self._mutex = None

    def __enter__(self):
        locks = self.locks
        if not locks.enabled or self.sr_uuid is None:
            return self
        _check_name(self.sr_uuid, "SR uuid")
        with locks._mutex:
            self._mutex = locks._sr_mutex.setdefault(self.sr_uuid, threading.Lock())
        deadline = locks._clock() + self.timeout
        # In-process first: POSIX locks do not exclude our own threads, and a second descriptor
        # closed by one thread would drop the lock of another.
        if not self._mutex.acquire(timeout=max(0.0, self.timeout)):
            raise SRBusy("SR %s: the sr lock is busy in this process" % self.sr_uuid)
        try:
            path, fd = locks._open(self.sr_uuid, SR_LOCK)
            try:
                while not _try_lock(fd, False):
                    if locks._clock() >= deadline:
                        raise SRBusy(
                            "SR %s: an SM operation holds %s for more than %gs"
                            % (self.sr_uuid, path, self.timeout)
                        )
                    locks._sleep(locks.poll_interval)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        except BaseException:
            self._mutex.release()
            raise
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            _unlock(self._fd, False)
            os.close(self._fd)
            self._fd = None
        if self._mutex is not None:
            self._mutex.release()
            self._mutex = None
