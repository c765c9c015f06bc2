"""A stop request that signal handlers can make safely (self-pipe, no lock).

Why not ``threading.Event``: Python runs signal handlers in the main thread, between any two
bytecodes of whatever that thread is doing. ``Event.set()`` takes the Event's internal lock, so a
handler that calls it deadlocks the main thread on itself when the signal lands while that lock is
held by the same thread: inside ``Event.wait()`` (entering or leaving its condition wait), or inside
a first handler's ``set()`` when a second signal arrives (``kill PID`` followed by a shell's exit
trap ``kill PID``, systemd plus an operator, Ctrl-C twice). ``fastpath-agent serve`` hung forever
that way on SIGTERM (py-spy: ``_on_signal -> Event.set -> Condition.__enter__`` nested in
``_on_signal -> Event.set -> notify_all``).

Here the handler only stores the signal number and ``os.write``s one byte to a non-blocking pipe
(both safe to re-enter at any point); ``wait`` selects on the pipe's read end, so a signal that
arrives just before ``select`` still wakes it.

    stop = SignalStop()
    stop.install(signal.SIGTERM, signal.SIGINT)
    stop.wait()            # returns once a signal came
"""

import os
import select
import signal


class SignalStop(object):
    def __init__(self):
        self.signum = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def handler(self, signum, frame=None):
        """The signal handler (also callable directly to request a stop)."""
        self.signum = signum
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass  # the pipe is full (a wake-up is already pending) or closed

    def install(self, *signums):
        """Make ``handler`` the handler of ``signums``; returns the previous handlers (a dict)."""
        previous = {}
        for s in signums:
            previous[s] = signal.signal(s, self.handler)
        return previous

    def is_set(self):
        return self.signum is not None

    def wait(self, timeout=None):
        """True once a stop was requested (at once if it already was), False after ``timeout``
        seconds without one (None: wait as long as it takes)."""
        if self.signum is not None:
            return True
        try:
            select.select([self._r], [], [], timeout)
        except ValueError:  # closed
            pass
        return self.signum is not None

    def close(self):
        fds = (self._r, self._w)
        self._r = self._w = -1  # first: a late handler then writes to no (possibly reused) fd
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
