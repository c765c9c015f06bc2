"""The xapi side of the "processes" export model: attach (start tapdisk), run vhd-tool, relay, detach.

Real xapi (xapi-project/xen-api `ocaml/xapi/export_raw_vdi.ml`, `vhd_tool_wrapper.ml`): send the
HTTP 200 headers on the client's socket, attach the VDI (and the base) read-only to dom0
(`Sm_fs_ops.with_block_attached_device`: tapdisk), exec vhd-tool with the client's socket as its
destination fd and a pipe as stdout, read progress from the pipe until EOF, `waitpid`; a non-zero exit
becomes VDI_IO_ERROR "Device I/O errors"; then detach (tapdisk ends). Here the "device" vhd-tool
gets is a ring: a socketpair for requests and a memfd for the data pages, shared by the two children.

TLS: on XCP-ng the HTTPS port is stunnel (`stunnel@xapi`, config written by xapi:
`accept = <https port>`, `connect = 80`, `socket = l:TCP_NODELAY=1` ...; xapi-project/xen-api
`ocaml/xapi/xapi_stunnel_server.ml`; `doc/content/xapi/internals/certificates.md`: xapi-ssl.pem is
"referenced by /etc/stunnel/xapi.conf"), so the socket xapi hands to vhd-tool is stunnel's plain
connection to port 80 and the bytes cross stunnel, which encrypts them, before reaching the client.
hostsim terminates TLS inside its XAPI server process (hostsim/server.py), and an SSL session cannot
be handed to another process, so the stunnel hop is a relay in this (the XAPI) process: vhd-tool writes
to one end of a socketpair, the relay reads the other end and writes into the TLS connection. Same hops
and copies as stunnel (vhd-tool -> socket -> TLS terminator -> client); the difference is that the
relay shares its process with the XML-RPC server instead of being a separate stunnel. Over plain HTTP
vhd-tool gets the client's socket itself, as on a real host's port 80.

Nothing here sleeps or throttles; every wait is bounded, and every child is killed and reaped on any
failure (a client that goes away, a child that dies).
"""

import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading

from hostsim.xapiexport import blkif

RELAY_CHUNK = 256 << 10  # one recv from vhd-tool, written as TLS records by the ssl module
CHILD_EXIT_TIMEOUT = 30

_live = set()
_live_lock = threading.Lock()


class ExportFailed(Exception):
    """The pipeline did not deliver the whole stream (a child failed, or the client went away)."""


def live():
    """[(tapdisk pid, vhd-tool pid)] of the pipelines running now (for tests and diagnostics)."""
    with _live_lock:
        return [
            (p.tapdisk.pid if p.tapdisk else None, p.vhdtool.pid if p.vhdtool else None)
            for p in _live
        ]


def _python_module(module, *args):
    return [sys.executable, "-m", module, *args]


def _kill(proc):
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(proc, timeout=CHILD_EXIT_TIMEOUT):
    if proc is None:
        return None
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return proc.wait(10)


def _tail(f, limit=2000):
    try:
        f.seek(0)
        return f.read()[-limit:].decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        return ""


class Pipeline:
    """One export: tapdisk + vhd-tool (+ the TLS relay when `client` is an SSL socket)."""

    def __init__(self, leaf, base=None, direct=True):
        self.leaf, self.base, self.direct = leaf, base, direct
        self.tapdisk = self.vhdtool = None

    def run(self, client, progress=None):
        """Stream the VHD to `client` (a socket, plain or SSL); raises ExportFailed."""
        import ssl

        tls = isinstance(client, ssl.SSLSocket)
        ring_xapi = ring_tap = relay_in = relay_out = None
        data_fd = None
        logs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        progress_r = None
        with _live_lock:
            _live.add(self)
        try:
            ring_tap, ring_vhdtool = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ring_xapi = ring_vhdtool
            # the ring's data pages, mapped by both tapdisk and the reader (blkif.py)
            data_fd = os.memfd_create("blktap-ring-data")
            os.ftruncate(data_fd, blkif.RING_DATA_BYTES)
            me = str(os.getpid())
            tap_args = [
                "--ring-fd",
                str(ring_tap.fileno()),
                "--data-fd",
                str(data_fd),
                "--vhd",
                self.leaf,
                "--parent-pid",
                me,
            ]
            if not self.direct:
                tap_args.append("--buffered")
            self.tapdisk = subprocess.Popen(
                _python_module("hostsim.xapiexport.tapdisk", *tap_args),
                pass_fds=[ring_tap.fileno(), data_fd],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=logs[0],
            )
            ring_tap.close()
            ring_tap = None
            if tls:
                relay_in, relay_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                dest = relay_out.fileno()
            else:
                dest = client.fileno()
            vt_args = [
                "--tapdev-fd",
                str(ring_vhdtool.fileno()),
                "--data-fd",
                str(data_fd),
                "--vhd",
                self.leaf,
                "--destination-fd",
                str(dest),
                "--progress",
                "--parent-pid",
                me,
            ]
            if self.base:
                vt_args += ["--relative-to", self.base]
            self.vhdtool = subprocess.Popen(
                _python_module("hostsim.xapiexport.vhdtool", *vt_args),
                pass_fds=[ring_vhdtool.fileno(), data_fd, dest],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=logs[1],
            )
            ring_vhdtool.close()
            ring_xapi = None
            os.close(data_fd)
            data_fd = None
            if relay_out is not None:
                relay_out.close()
                relay_out = None
            progress_r = self.vhdtool.stdout
            self._supervise(progress_r, relay_in, client, progress)
            rc = _reap(self.vhdtool)
            if rc != 0:
                raise ExportFailed("vhd-tool failed (exit %s): %s" % (rc, _tail(logs[1])))
            rc = _reap(self.tapdisk)  # the ring closed when vhd-tool exited: tapdisk ends (detach)
            if rc != 0:
                raise ExportFailed("tapdisk failed (exit %s): %s" % (rc, _tail(logs[0])))
        except BaseException:
            _kill(self.vhdtool)
            _kill(self.tapdisk)
            raise
        finally:
            for s in (ring_tap, ring_xapi, relay_in, relay_out):
                if s is not None:
                    s.close()
            if data_fd is not None:
                os.close(data_fd)
            if progress_r is not None:
                progress_r.close()
            _reap(self.vhdtool, 10)
            _reap(self.tapdisk, 10)
            for f in logs:
                f.close()
            with _live_lock:
                _live.discard(self)

    def _supervise(self, progress_r, relay_in, client, progress):
        """Read progress until vhd-tool closes its stdout; with TLS, relay its stream meanwhile."""
        sel = selectors.DefaultSelector()
        sel.register(progress_r, selectors.EVENT_READ, "progress")
        buf = bytearray(RELAY_CHUNK)
        view = memoryview(buf)
        if relay_in is not None:
            sel.register(relay_in, selectors.EVENT_READ, "relay")
        pending = b""
        try:
            while sel.get_map():
                for key, _ in sel.select():
                    if key.data == "progress":
                        chunk = os.read(progress_r.fileno(), 64)
                        if not chunk:
                            sel.unregister(progress_r)
                            continue
                        pending += chunk
                        while len(pending) >= 3:
                            pct, pending = pending[:3], pending[3:]
                            if progress is not None and pct.isdigit():
                                progress(int(pct))
                    else:
                        n = relay_in.recv_into(buf)
                        if n == 0:
                            sel.unregister(relay_in)
                            continue
                        try:
                            client.sendall(view[:n])
                        except OSError as e:
                            raise ExportFailed("the client went away: %s" % e) from e
        finally:
            view.release()
            sel.close()
