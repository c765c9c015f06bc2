"""agent.signalstop: a stop request that a signal handler can make at any moment.

`fastpath-agent serve` used to set a threading.Event from its SIGTERM handler and hung for good when
a second SIGTERM arrived while the first handler held the Event's lock (docs/nbd.md's block sends
two: `kill "$AGENT_PID"` and its exit trap's `kill`; 2 of 8 CI runs timed out there). Signal
handlers run in the main thread between two bytecodes of whatever it is doing, so the property to
test is re-entrancy: the handler may run again at ANY line of the handler itself, and at any line of
the waiting code. `reenter_at_every_line` forces exactly that interleaving with a trace function
(deterministic, no timing), and the control case shows it catches the Event-based handler.
"""

import os
import signal
import subprocess
import sys
import threading

from agent.signalstop import SignalStop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reenter_at_every_line(outer, inner, timeout=10.0):
    """Run ``outer()`` in a thread; before every line that runs in ``outer``'s Python frames (and
    the frames they call), run ``inner()`` to completion, as a signal handler would be run there.
    Returns (finished within ``timeout``, outer's result, number of re-entries)."""
    result = []
    entries = [0]

    def tracer(frame, event, arg):
        if event == "line":
            # the trace function runs untraced: inner() itself is not re-entered (one level)
            entries[0] += 1
            inner()
        return tracer

    def run():
        sys.settrace(tracer)
        try:
            result.append(outer())
        finally:
            sys.settrace(None)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return (not t.is_alive(), result[0] if result else None, entries[0])


def test_handler_can_be_reentered_anywhere_in_itself():
    """A second signal while the first handler runs (kill; kill)."""
    stop = SignalStop()
    try:
        ok, _, entries = reenter_at_every_line(
            lambda: stop.handler(signal.SIGTERM, None),
            lambda: stop.handler(signal.SIGINT, None),
        )
        assert ok, "the handler deadlocked when re-entered"
        assert entries >= 2  # it was re-entered at several points
        assert stop.is_set() and stop.wait(0)
    finally:
        stop.close()


def test_handler_can_run_anywhere_inside_wait():
    """A signal that lands while the main thread is inside wait() (one SIGTERM)."""
    stop = SignalStop()
    try:
        ok, woke, entries = reenter_at_every_line(
            lambda: stop.wait(30), lambda: stop.handler(signal.SIGTERM, None)
        )
        assert ok and woke is True and entries >= 1
    finally:
        stop.close()


def test_signal_before_wait_is_not_lost():
    stop = SignalStop()
    try:
        stop.handler(signal.SIGTERM, None)
        assert stop.wait(None) is True and stop.signum == signal.SIGTERM
        assert stop.wait(0) is True  # stays set
    finally:
        stop.close()


def test_wait_times_out_without_a_signal():
    stop = SignalStop()
    try:
        assert stop.wait(0) is False and not stop.is_set()
    finally:
        stop.close()


def test_many_handler_calls_never_block():
    """More wake-ups than the pipe holds: the handler must not block on a full pipe."""
    stop = SignalStop()
    try:
        ok, _, _ = reenter_at_every_line(
            lambda: [stop.handler(signal.SIGTERM, None) for _ in range(200000)], lambda: None
        )
        assert ok and stop.wait(0)
    finally:
        stop.close()


def test_real_signals_wake_the_main_thread():
    """In a child process (signal handlers live in the main thread): SignalStop installed for
    SIGTERM, a burst of SIGTERMs, the child exits 0. Bounded by the subprocess timeout."""
    code = (
        "import os, signal, threading\n"
        "from agent.signalstop import SignalStop\n"
        "stop = SignalStop()\n"
        "stop.install(signal.SIGTERM)\n"
        "def burst():\n"
        "    for _ in range(200):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Thread(target=burst).start()\n"
        "while not stop.wait(1.0):\n"
        "    pass\n"
        "print('stopped', stop.signum == signal.SIGTERM)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "stopped True", proc.stderr


def test_control_event_set_handler_deadlocks_under_the_same_harness():
    """The harness catches the old handler: threading.Event.set re-entered inside itself hangs
    (run in a child process, killed by the timeout, so no thread stays stuck here)."""
    code = (
        "import threading, sys\n"
        "from tests.nbd.test_signalstop import reenter_at_every_line\n"
        "ev = threading.Event()\n"
        "ok, _, _ = reenter_at_every_line(ev.set, ev.set, timeout=3)\n"
        "print('finished' if ok else 'deadlocked')\n"
        "sys.stdout.flush()\n"
        "import os; os._exit(0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "deadlocked", (proc.stdout, proc.stderr)
    # and Event.wait with Event.set run inside it (one signal during the wait) hangs as well
    code = code.replace(
        "reenter_at_every_line(ev.set, ev.set", "reenter_at_every_line(lambda: ev.wait(30), ev.set"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "deadlocked", (proc.stdout, proc.stderr)


AGENT_CHILD = r"""
import os, signal, sys, threading, time
captured = {}
_real_signal = signal.signal


def _capture(signum, handler):
    if signum == signal.SIGTERM:
        captured["handler"] = handler
    return _real_signal(signum, handler)


signal.signal = _capture
from agent import cli
from tests.nbd.test_signalstop import reenter_at_every_line

lab = sys.argv[1]
ready = os.path.join(lab, "ready")


def poke():
    deadline = time.time() + 60
    while not os.path.exists(ready) and time.time() < deadline:
        time.sleep(0.05)
    h = captured["handler"]
    ok, _, n = reenter_at_every_line(
        lambda: h(signal.SIGTERM, None), lambda: h(signal.SIGTERM, None), timeout=5
    )
    print("handler re-entered %d times: %s" % (n, "ok" if ok else "deadlocked"), flush=True)
    if not ok:
        os._exit(3)


t = threading.Thread(target=poke, daemon=True)
t.start()
rc = cli.main(["serve", "--sr-root", lab, "--tls", "off", "--nbd-listen", "127.0.0.1:0",
               "--http-listen", "127.0.0.1:0", "--admin-socket", os.path.join(lab, "agent.sock"),
               "--ready-file", ready])
t.join(30)
sys.exit(rc if not t.is_alive() else 4)
"""


def test_agent_serve_sigterm_handler_is_reentrant(tmp_path):
    """`fastpath-agent serve`'s own SIGTERM handler (captured as it installs it) re-entered at every
    line of itself, as `kill; kill` does: the agent must neither deadlock nor miss the stop, and it
    exits 0 (clean shutdown)."""
    proc = subprocess.run(
        [sys.executable, "-c", AGENT_CHILD, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert ": ok" in proc.stdout
