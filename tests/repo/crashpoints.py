"""Deterministic kill points for kill -9 tests (local backend, backup writer, copy).

A kill after a random delay lands wherever the child happens to be; on a loaded machine it may
never land inside the window a test is about (a batch staged but not published, an object half
written), and a test that then asserts "some kill landed there" is flaky. Here the child process
(a script run with ``python -c``) arms one kill point before it starts working: on the ``n``-th
time a thread reaches it, the child writes ``at <point>`` on stdout and stops itself (SIGSTOP:
every thread at once, so nothing moves past the point); the parent reads the line and sends
SIGKILL, which ends a stopped process like a running one. The state on disk is then exactly the
state a kill at that instant leaves, with no timing involved. Nothing here touches production
code: the points are wrappers the child installs around the local backend and ``os`` calls.

Child side: :func:`arm` (``point`` one of :data:`POINTS`) or :func:`arm_after_call`. Parent
side: :func:`spawn`, :func:`kill_at_point`, :func:`kill_after`.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time

POINTS = (
    "mid-write",  # a write to a file whose path contains ``match`` made half of its bytes
    "publish-start",  # LocalBackend.publish called: its batch staged, nothing fsynced or renamed
    "after-rename",  # an os.replace onto a name containing ``match`` done (rest of batch not)
    "publish-end",  # LocalBackend.publish returned: batch durable, no index names it yet
    "before-rename",  # os.replace onto a name containing ``match`` about to run
    "after-link",  # put_if_absent linked its temporary to the final name, not yet unlinked
)


def freeze(where: str) -> None:
    """Report ``where`` to the parent and stop the whole process until it is killed."""
    sys.stdout.write(f"at {where}\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGSTOP)
    threading.Event().wait()  # never resumed: the parent SIGKILLs the stopped process


class _Countdown:
    def __init__(self, n: int):
        self.n = n
        self.lock = threading.Lock()

    def hit(self) -> bool:
        with self.lock:
            self.n -= 1
            return self.n == 0


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def arm(point: str, n: int, match: str = "/") -> None:
    """In the child: stop at the ``n``-th arrival at ``point`` (counted over all threads)."""
    from orchestrator.repo.backends import local

    count = _Countdown(n)
    where = f"{point} {n}"
    if point == "mid-write":
        real_write = os.write

        def write(fd, data):
            path = _fd_path(fd)
            # by path, not by temporary prefix: a writer that wrote in place must be caught too
            if match in path:
                if count.hit():
                    view = memoryview(data)
                    done = real_write(fd, view[: max(1, len(view) // 2)])
                    assert done < len(view), "nothing torn: the object was too small"
                    freeze(where)
            return real_write(fd, data)

        local.os.write = write  # local.os is os: the module's calls go through it
    elif point in ("publish-start", "publish-end"):
        real_publish = local.LocalBackend.publish

        @functools.wraps(real_publish)
        def publish(self, batch):
            if point == "publish-start" and count.hit():
                freeze(where)
            real_publish(self, batch)
            if point == "publish-end" and count.hit():
                freeze(where)

        local.LocalBackend.publish = publish
    elif point in ("after-rename", "before-rename"):
        real_replace = os.replace

        def replace(src, dst):
            hit = match in os.fspath(dst) and count.hit()
            if hit and point == "before-rename":
                freeze(where)
            real_replace(src, dst)
            if hit and point == "after-rename":
                freeze(where)

        local.os.replace = replace
    elif point == "after-link":
        real_link = os.link

        def link(src, dst):
            real_link(src, dst)
            if match in os.fspath(dst) and count.hit():
                freeze(where)

        local.os.link = link
    else:
        raise ValueError(f"unknown kill point {point!r}; known: {POINTS}")


def arm_after_call(cls: type, name: str, n: int, wanted) -> None:
    """In the child: stop right after the ``n``-th call of ``cls.name(*args)`` for which
    ``wanted(*args)`` is true has returned (e.g. the n-th object stored by a backend)."""
    count = _Countdown(n)
    real = getattr(cls, name)

    @functools.wraps(real)
    def method(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if wanted(*args) and count.hit():
            freeze(f"{name} {n}")
        return result

    setattr(cls, name, method)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spawn(script: str, *args: object) -> subprocess.Popen:
    """Run ``script`` with ``python -c`` from the repository root; it prints ``ready`` once set
    up (imports done, point armed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    line = proc.stdout.readline()
    if line != b"ready\n":
        _kill(proc)
        raise AssertionError(f"child did not start: {line!r} {_stderr(proc)}")
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    return proc.stderr.read().decode(errors="replace")[-3000:]


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _died_of_the_kill(proc: subprocess.Popen) -> None:
    err = _stderr(proc)
    assert proc.returncode == -signal.SIGKILL and "Traceback" not in err, err


def _close(proc: subprocess.Popen) -> None:
    proc.stdout.close()
    proc.stderr.close()


def kill_at_point(proc: subprocess.Popen) -> str:
    """Wait for the child to stop at its point, kill -9 it there; returns ``<point> <n>``.
    A child that exits instead (a bug, or a point never reached) fails with its stderr."""
    try:
        line = proc.stdout.readline().decode()
        while line and not line.startswith("at "):  # the child's own output
            line = proc.stdout.readline().decode()
        if not line:
            _kill(proc)
            raise AssertionError(f"child never reached its kill point: {line!r} {_stderr(proc)}")
        _kill(proc)
        _died_of_the_kill(proc)
        return line[3:].strip()
    finally:
        if proc.returncode is None:
            _kill(proc)
        _close(proc)


def kill_after(proc: subprocess.Popen, delay: float) -> None:
    """kill -9 the child after ``delay`` seconds, wherever it is; it must still be working then
    (a child that died by itself proves nothing)."""
    try:
        time.sleep(delay)
        assert proc.poll() is None, _stderr(proc)
        _kill(proc)
        _died_of_the_kill(proc)
    finally:
        if proc.returncode is None:
            _kill(proc)
        _close(proc)
