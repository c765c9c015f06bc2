"""Measuring one step of ``fastpath bench``: a command run as its own process, and its costs.

Every measured thing runs as its own process, reaped with ``os.wait4`` (its CPU seconds are its
own) under ``/usr/bin/time`` (its peak RSS is its own: a child forked straight from the bench's big
Python process would inherit that process's RSS high-water mark across exec). The servers' CPU is
read from ``/proc/<pid>/stat`` (utime+stime of the agent, of hostsim — whose figures include the
XAPI plugin it spawns — or of qemu-nbd) before and after, and their peak RSS from ``VmHWM`` (the
process's lifetime peak).

Also here: the environment of the children (``child_env``: the source tree on PYTHONPATH) and the
small process helpers the harness uses (``wait_file``, ``stop``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
STEP_TIMEOUT = 3600
TIME = "/usr/bin/time"


def proc_cpu(pid: int) -> float:
    """utime+stime+cutime+cstime of a running process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK


def proc_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_measured(
    cmd: list[str],
    servers: list[int] = (),
    env: dict[str, str] | None = None,
    timeout: float = STEP_TIMEOUT,
) -> tuple[dict[str, Any], str]:
    """Run ``cmd``; returns (sample, its stdout). Fails with the command's stderr tail."""
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    rss_fd, rss_path = tempfile.mkstemp(prefix="fastpath-bench-rss-")
    os.close(rss_fd)
    # /usr/bin/time (small, C) forks the command and reports its peak RSS: a child forked
    # straight from this big Python process would inherit its RSS high-water mark across exec.
    wrapped = [TIME, "-f", "%M", "-o", rss_path, "--", *cmd]
    before = [proc_cpu(p) for p in servers]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        wrapped, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True
    )
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C: the child is in its own session, so stop it here
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.wait4(proc.pid, 0)
        with contextlib.suppress(OSError):
            os.unlink(rss_path)
        out.close()
        err.close()
        raise
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    server_cpu = sum(proc_cpu(p) - b for p, b in zip(servers, before, strict=True))
    out.seek(0)
    err.seek(0)
    stdout = out.read().decode(errors="replace")
    stderr = err.read().decode(errors="replace")
    out.close()
    err.close()
    try:
        with open(rss_path) as f:
            rss_kib = int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        rss_kib = usage.ru_maxrss
    finally:
        os.unlink(rss_path)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])}… exited with {proc.returncode}: {stderr.strip()[-800:]}"
        )
    sample = {
        "seconds": seconds,
        "client_cpu": usage.ru_utime + usage.ru_stime,
        "server_cpu": server_cpu if servers else None,
        "client_rss": rss_kib * 1024,
        "server_rss": max(proc_hwm(p) for p in servers) if servers else None,
    }
    return sample, stdout


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def wait_file(path: str, proc: subprocess.Popen, timeout: float, what: str, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = open(log, errors="replace").read()[-1500:] if os.path.exists(log) else ""
            raise RuntimeError(f"{what} did not start: {tail}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
