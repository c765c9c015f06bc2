"""Helpers of the SR tests: an SM-like file SR (hostsim.sm.FileSR) whose GC locks `running` in a
temporary lock directory, and a child process that takes SM's locks the way SM does (fcntl record
locks, drivers/flock.py), since POSIX locks never conflict inside one process."""

import os
import subprocess
import sys
import time
import uuid as uuidlib

import pytest

MiB = 1 << 20
KiB = 1 << 10
TIMEOUT = 30

# A stand-in for an SM process: takes a lock file with fcntl F_SETLK (as SM's flock.WriteLock),
# prints "locked" (or "busy"), then optionally releases it when a flag file appears (SM's GC
# polling its abort flag), or when stdin closes.
SM_HOLDER = r"""
import fcntl, os, struct, sys, time
path, mode, flag = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(os.path.dirname(path), exist_ok=True)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
lk = struct.pack("hhqql", fcntl.F_WRLCK, 0, 0, 0, 0)
try:
    fcntl.fcntl(fd, fcntl.F_SETLK, lk)
except OSError:
    print("busy", flush=True)
    sys.exit(0)
print("locked", flush=True)
deadline = time.time() + 60
if mode == "abortable":
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.02)
    print("aborting", flush=True)
    sys.exit(0)
sys.stdin.read()
"""


class SMProcess(object):
    """A child process holding (or trying) an SM lock file."""

    def __init__(self, path, mode="hold", flag="-"):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SM_HOLDER, path, mode, flag],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.state = self.proc.stdout.readline().strip()

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stdin):
            try:
                stream.close()
            except OSError:
                pass


def sm_can_lock(path):
    """Whether another process could take the lock right now (SM's trylock)."""
    p = SMProcess(path, mode="hold")
    try:
        return p.state == "locked"
    finally:
        p.stop()


@pytest.fixture
def sm_processes():
    started = []

    def start(path, mode="hold", flag="-"):
        p = SMProcess(path, mode, flag)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


class SMTree(object):
    """An SM-like file SR under tmp: <root>/<sr>/<uuid>.vhd, GC locking <lock_dir>/<sr>/running."""

    def __init__(self, tmp_path):
        from hostsim.sm import FileSR as SimSR

        self.root = str(tmp_path / "sr-mount")
        self.lock_dir = str(tmp_path / "lock-sm")
        self.ipc_dir = str(tmp_path / "ipc")
        os.makedirs(self.root)
        os.makedirs(self.lock_dir)
        self.sr_uuid = str(uuidlib.uuid4())
        self.sim = SimSR(self.root, self.sr_uuid, lock_dir=self.lock_dir)

    def locks(self, **kw):
        from agent.smlock import SMLocks

        kw.setdefault("abort_timeout", 5.0)
        kw.setdefault("sr_lock_timeout", 2.0)
        kw.setdefault("poll_interval", 0.02)
        return SMLocks(lock_dir=self.lock_dir, ipc_dir=self.ipc_dir, **kw)

    def file_sr(self, locked=True, **kw):
        from agent.smlock import SMLocks
        from agent.sr import FileSR

        locks = self.locks(**kw) if locked else SMLocks(lock_dir=None)
        return FileSR([self.root], locks=locks)

    def lock_path(self, name):
        return os.path.join(self.lock_dir, self.sr_uuid, name)

    def close(self):
        self.sim.close()


def pattern(seed, n):
    import random

    return random.Random(seed).randbytes(n)


def snapshot_scenario(tree, size=8 * MiB):
    """V written, snapshot S1 (base B1), V written again, snapshot S2 (base B2 on B1), V written a
    third time. Returns (uuids dict, models dict: guest bytes of S1, S2 and V)."""
    sim = tree.sim
    v = sim.create(size)
    model = bytearray(size)

    def write(off, data):
        sim.write(v, off, data)
        model[off : off + len(data)] = data

    write(0, pattern(1, 3 * MiB))
    write(5 * MiB, pattern(2, 1 * MiB))
    s1, b1 = sim.snapshot(v)
    m_s1 = bytes(model)
    write(1 * MiB, pattern(3, 3 * MiB))  # block 1 whole in B2 (sendfile from B2)
    write(6 * MiB + 4 * KiB, pattern(4, 512 * KiB))
    s2, b2 = sim.snapshot(v)
    m_s2 = bytes(model)
    write(0, pattern(5, 1 * MiB))
    write(2 * MiB + 8 * KiB, pattern(6, 4 * MiB))
    return (
        {"v": v, "s1": s1, "b1": b1, "s2": s2, "b2": b2},
        {"s1": m_s1, "s2": m_s2, "v": bytes(model)},
    )


@pytest.fixture
def sm_tree(tmp_path):
    t = SMTree(tmp_path)
    yield t
    t.close()


def wait_for(pred, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
