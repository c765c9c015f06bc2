"""NBD reading with libnbd: several connections, many requests in flight, block status, TLS.

Each connection is a libnbd handle driven by its own thread through the aio API: up to ``depth``
``aio_pread`` requests in flight, ``poll`` to make progress, completion callbacks collecting the
finished blocks (the blocking libnbd calls release the GIL, so connections overlap). A failed
connection is re-opened (``retries`` times, with backoff) and its unfinished blocks re-issued.

TLS and pinning. libnbd 1.14 cannot show the peer certificate to its caller, so pinning is done
in two steps: ``fetch_peer_certificate`` performs the NBD handshake up to ``NBD_OPT_STARTTLS``
itself, completes a TLS handshake with Python's ssl module, checks the SHA-256 fingerprint of the
certificate against the one the agent's plugin returned, and aborts the negotiation; the pinned
certificate is then written as the *only* CA of a libnbd certificates directory and libnbd
connects with ``set_tls_verify_peer(True)``: a server presenting any other certificate (or one
not naming the address) fails libnbd's own verification. So the fingerprint is checked by us and
the exact certificate is enforced by GnuTLS on every connection.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable

from orchestrator.sources.base import (
    Source,
    SourceError,
    SourceUnavailable,
    Stopped,
    split_round_robin,
)

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_ABORT = 2
OPT_STARTTLS = 5
REPLY_MAGIC = 0x3E889045565A9
REP_ACK = 1
STATE_HOLE = 1
STATE_ZERO = 2
CONTEXT_ALLOCATION = "base:allocation"
CONTEXT_CHANGED = "fastpath:changed"


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ConnectionError("server closed the connection during the handshake")
        buf += data
    return bytes(buf)


def fetch_peer_certificate(host: str, port: int, timeout: float = 15.0) -> bytes:
    """The DER certificate an NBD server presents after NBD_OPT_STARTTLS."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        hello = _recv_exact(raw, 18)
        if hello[:8] != NBD_MAGIC or hello[8:16] != IHAVEOPT:
            raise SourceError(f"nbd://{host}:{port}: not a newstyle NBD server")
        raw.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        raw.sendall(IHAVEOPT + struct.pack(">II", OPT_STARTTLS, 0))
        magic, opt, rep, length = struct.unpack(">QIII", _recv_exact(raw, 20))
        if length:
            _recv_exact(raw, length)
        if magic != REPLY_MAGIC or opt != OPT_STARTTLS or rep != REP_ACK:
            raise SourceError(f"nbd://{host}:{port}: STARTTLS refused (reply {rep:#x})")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # we check the fingerprint instead
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            try:
                tls.sendall(IHAVEOPT + struct.pack(">II", OPT_ABORT, 0))
                _recv_exact(tls, 20)
            except (OSError, ConnectionError):
                pass
    if not der:
        raise SourceError(f"nbd://{host}:{port}: no server certificate")
    return der


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


class TlsConfig:
    """A libnbd certificates directory trusting exactly one certificate."""

    def __init__(self, pem: str):
        self.dir = tempfile.mkdtemp(prefix="fastpath-nbd-tls-")
        with open(os.path.join(self.dir, "ca-cert.pem"), "w") as f:
            f.write(pem)

    @classmethod
    def pinned(cls, host: str, port: int, expected: str) -> TlsConfig:
        try:
            der = fetch_peer_certificate(host, port)
        except (OSError, ConnectionError) as exc:
            raise SourceUnavailable(f"nbds://{host}:{port}: cannot connect: {exc}") from exc
        got = fingerprint(der)
        if got.lower() != expected.lower().replace(":", ""):
            raise SourceError(
                f"nbds://{host}:{port}: certificate fingerprint {got} does not match the pinned "
                f"{expected} (refusing to connect)"
            )
        return cls(ssl.DER_cert_to_PEM_cert(der))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class NbdEndpoint:
    """Where and how to connect (one per disk); ``handle()`` makes a connected libnbd handle."""

    def __init__(
        self,
        host: str,
        port: int,
        export: str,
        *,
        tls: TlsConfig | None = None,
        contexts: tuple[str, ...] = (),
        structured: bool = True,
        timeout: float = 60.0,
    ):
        self.host = host
        self.port = int(port)
        self.export = export
        self.tls = tls
        self.contexts = contexts
        self.structured = structured
        self.timeout = timeout

    @property
    def url(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        return f"{scheme}://{self.host}:{self.port}/{self.export}"

    def handle(self):
        import nbd

        h = nbd.NBD()
        h.set_handle_name("fastpath")
        h.set_export_name(self.export)
        h.set_request_structured_replies(self.structured)
        for c in self.contexts:
            h.add_meta_context(c)
        if self.tls is not None:
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(self.tls.dir)
            h.set_tls_verify_peer(True)
        # aio connect + poll with a deadline: a hung server cannot hang the handshake.
        deadline = time.monotonic() + self.timeout
        try:
            h.aio_connect_tcp(self.host, str(self.port))
            while not h.aio_is_ready():
                if h.aio_is_dead() or h.aio_is_closed():
                    raise SourceUnavailable(f"{self.url}: connection failed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SourceUnavailable(
                        f"{self.url}: no NBD handshake within {self.timeout:g} s"
                    )
                h.poll(max(1, int(min(left, 1.0) * 1000)))
        except nbd.Error as exc:
            _close_handle(h)
            raise SourceUnavailable(f"{self.url}: {exc}") from exc
        except BaseException:
            _close_handle(h)
            raise
        return h


def block_status_blocks(
    h,
    size: int,
    block_size: int,
    context: str,
    want: Callable[[int], bool],
    timeout: float = 60.0,
):
    """Blocks with at least one extent whose flags satisfy ``want`` (walks the whole disk with
    ``aio_block_status``, so a server that stops answering is a timeout, not a hang)."""
    import nbd

    if not h.can_meta_context(context):
        raise SourceError(f"the server does not offer the {context} meta context")
    found: set[int] = set()
    pos = 0
    step = 1 << 30
    while pos < size:
        length = min(step, size - pos)
        reached = [pos]
        status: list[int] = []

        def cb(metacontext, offset, entries, err, _reached=reached):
            if metacontext != context:
                return 0
            off = offset
            for k in range(0, len(entries), 2):
                n, flags = entries[k], entries[k + 1]
                if n <= 0:
                    break
                if want(flags):
                    first = off // block_size
                    last = (min(off + n, size) - 1) // block_size
                    found.update(range(first, last + 1))
                off += n
            _reached[0] = max(_reached[0], off)
            return 0

        def completed(error, _status=status):
            _status.append(getattr(error, "value", error) or 0)
            return 1

        try:
            h.aio_block_status(length, pos, cb, completion=completed)
            deadline = time.monotonic() + timeout
            while not status:
                if h.poll(1000):
                    deadline = time.monotonic() + timeout  # progress
                elif time.monotonic() > deadline:
                    raise SourceError(f"block status ({context}): no answer for {timeout:g} s")
        except nbd.Error as exc:
            raise SourceError(f"block status ({context}) at {pos}: {exc}") from exc
        if status[0]:
            raise SourceError(f"block status ({context}) at {pos}: {os.strerror(status[0])}")
        if reached[0] <= pos:
            raise SourceError(f"block status ({context}) made no progress at offset {pos}")
        pos = reached[0]
    return sorted(b for b in found if b * block_size < size)


class NbdBlockReader:
    """Reads blocks over ``connections`` handles with ``depth`` requests in flight each."""

    def __init__(
        self,
        endpoint: NbdEndpoint,
        size: int,
        block_size: int,
        *,
        depth: int = 4,
        retries: int = 3,
        backoff: float = 0.5,
        first_handle=None,
    ):
        self.endpoint = endpoint
        self.size = size
        self.block_size = block_size
        self.depth = max(1, depth)
        self.retries = retries
        self.backoff = backoff
        self._spare = first_handle  # the planning connection, reused by the first worker
        self._spare_lock = threading.Lock()
        self.retry_count = 0

    def _take_handle(self):
        with self._spare_lock:
            h, self._spare = self._spare, None
        return h or self.endpoint.handle()

    def close(self) -> None:
        with self._spare_lock:
            h, self._spare = self._spare, None
        if h is not None:
            _close_handle(h)

    def worker(self, blocks: list[int]):
        def run(emit):
            todo = list(reversed(blocks))
            attempt = 0
            h = None
            while todo:
                try:
                    if h is None:
                        h = self._take_handle()
                    self._drive(h, todo, emit)
                except Stopped:
                    break
                except (SourceError, OSError, Exception) as exc:
                    import nbd

                    if not isinstance(exc, nbd.Error | SourceError | OSError):
                        raise
                    if h is not None:
                        _close_handle(h)
                        h = None
                    attempt += 1
                    if attempt > self.retries:
                        text = str(exc)
                        if not text.startswith(self.endpoint.url):
                            text = f"{self.endpoint.url}: {text}"
                        raise SourceError(f"{text} (gave up after {self.retries} retries)") from exc
                    self.retry_count += 1
                    time.sleep(self.backoff * (2 ** (attempt - 1)))
                    continue
            if h is not None:
                _close_handle(h)

        return run

    def _drive(self, h, todo: list[int], emit) -> None:
        """Issue reads from ``todo`` (popped from the end) keeping ``depth`` in flight."""
        import nbd

        bs = self.block_size
        inflight: dict[int, object] = {}  # block -> buffer (callbacks retire their command)
        done: list[tuple[int, object]] = []
        failed: list[str] = []
        # libnbd 1.14's Python aio_pread keeps a reference to every nbd.Buffer it is given
        # (never released): fresh buffers per read would leak the whole disk. So each
        # connection reuses its own few buffers (one per request in flight, by length), each
        # sharing a bytearray of ours; a finished read is handed on as ``bytes(that array)``:
        # one 2 MiB copy per block (``to_bytearray`` then the writer's ``bytes()`` made two).
        free: dict[int, list] = {}

        def take(n):
            pool = free.setdefault(n, [])
            return pool.pop() if pool else nbd.Buffer.from_buffer(bytearray(n))

        def issue():
            while todo and len(inflight) < self.depth:
                i = todo.pop()
                n = min(bs, self.size - i * bs)
                buf = take(n)

                def cb(error, _i=i, _buf=buf):
                    code = getattr(error, "value", error)
                    if code:
                        failed.append(f"read of block {_i} failed: {os.strerror(code)}")
                        return 1
                    done.append((_i, _buf))
                    return 1

                try:
                    h.aio_pread(buf, i * bs, completion=cb)
                except BaseException:
                    todo.append(i)
                    free[n].append(buf)
                    raise
                inflight[i] = buf

        timeout = self.endpoint.timeout
        try:
            issue()
            last = time.monotonic()
            while inflight:
                if h.poll(1000) == 0 and not done:
                    if time.monotonic() - last > timeout:
                        raise SourceError(
                            f"{self.endpoint.url}: no answer for {timeout:g} s "
                            f"({len(inflight)} reads in flight)"
                        )
                    continue
                last = time.monotonic()
                if failed:
                    raise SourceError(f"{self.endpoint.url}: {failed[0]}")
                batch, done[:] = list(done), []
                for i, buf in batch:
                    inflight.pop(i, None)
                    data = bytes(buf.to_buffer())
                    free.setdefault(len(data), []).append(buf)
                    emit(i, data)
                issue()
        except BaseException:
            for i in inflight:
                todo.append(i)  # re-issued on the next connection
            raise


def _close_handle(h, timeout: float = 5.0) -> None:
    """Disconnect politely when the connection is idle and healthy (NBD_CMD_DISC, then up to
    ``timeout`` seconds for the server to hang up); otherwise, or after that, just drop it.
    Not ``h.shutdown()``: after DISC it polls without a bound until the server closes, so a server
    that keeps the connection (or commands of a hung one) would hang the caller."""
    try:
        if h.aio_is_ready() and h.aio_in_flight() == 0:
            h.aio_disconnect(0)
            deadline = time.monotonic() + timeout
            while not (h.aio_is_closed() or h.aio_is_dead()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                h.poll(max(1, int(min(left, 1.0) * 1000)))
    except Exception:
        pass
    close = getattr(h, "close", None)  # libnbd >= 1.16; 1.14 closes when collected
    if close is not None:
        try:
            close()
        except Exception:
            pass


class NbdSource(Source):
    """A Source whose blocks come from an NbdBlockReader over ``connections`` connections, with an
    optional TLS setup: what the agent's NBD and XAPI's NBD sources share once they are open."""

    connections = 1

    def __init__(self, **kw):
        super().__init__(**kw)
        self._tls: TlsConfig | None = None
        self._reader: NbdBlockReader | None = None

    def _workers(self, blocks):
        assert self._reader is not None
        return [self._reader.worker(part) for part in split_round_robin(blocks, self.connections)]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._tls is not None:
            self._tls.close()
            self._tls = None
