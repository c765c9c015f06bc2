"""Small process helpers shared by hostsim's tapdisk and vhd-tool stand-ins (no hostsim imports)."""

import ctypes
import os
import select
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid):
    """Ask the kernel to SIGKILL this process when the thread that spawned it ends, so a pipeline
    never outlives a hostsim that died; exit at once if that parent is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(3)


def note(who, text):
    try:
        sys.stderr.write("%s[%d]: %s\n" % (who, os.getpid(), text))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def send_all(sock, buffers):
    """sendmsg of several buffers, continuing after partial sends."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def write_all(fd, data):
    """write() until done; on a non-blocking fd (a socket the server gave a timeout) wait for room,
    as vhd-tool's direct_copy does (`pollwait(out_fd, POLLOUT)` on EAGAIN, direct_copy_stubs.c)."""
    view = memoryview(data).cast("B")
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]
