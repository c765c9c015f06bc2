"""Export tickets and the agent's local admin API.

A ticket names a VDI (and optionally its SR and a base VDI for incremental reads), expires, and
limits how many connections may use it at once. Its id (128 random bits, hex) is the NBD export
name. A ticket is a bearer token: whoever holds the id may use it, as often as its connection
limit allows, until it expires or is revoked; so an id never reaches a log whole (log_id). Expired or revoked tickets close their connections: the store calls its listeners, and the
servers close what they opened with that ticket.

The admin API is a Unix socket (root only) speaking JSON lines, one request and one response per
line:
    {"op": "ping"}
    {"op": "create_ticket", "vdi": UUID, "sr": UUID?, "base": UUID?, "ttl": SECONDS?,
     "max_connections": N?}
    {"op": "list_tickets"}
    {"op": "revoke_ticket", "id": ID}
    {"op": "stats"}
Responses: {"ok": true, ...} or {"ok": false, "error": "one line"}.
"""

import binascii
import json
import logging
import os
import socket
import struct
import threading
import time

log = logging.getLogger("fastpath.tickets")

# 32 of a ticket id's 128 bits: enough to tell tickets apart in logs, not to use one.
LOG_ID_CHARS = 8


def log_id(ticket_id):
    """A ticket id (or a client-supplied export name) as it may appear in logs: a short prefix.
    Every log line and error message naming a ticket goes through here."""
    if ticket_id is None:
        return "-"
    text = str(ticket_id)
    if len(text) <= LOG_ID_CHARS:
        return text
    return text[:LOG_ID_CHARS] + "..."


DEFAULT_TTL = 3600
MAX_TTL = 7 * 24 * 3600
DEFAULT_MAX_CONNECTIONS = 16
MAX_LINE = 64 * 1024


class TicketError(Exception):
    """A ticket cannot be used (unknown, expired, revoked, busy)."""


class Ticket(object):
    __slots__ = (
        "id",
        "vdi",
        "sr",
        "base",
        "created",
        "expires",
        "max_connections",
        "revoked",
        "connections",
        "expiry_notified",
    )

    def __init__(self, id, vdi, sr=None, base=None, created=None, expires=None, max_connections=16):
        self.id = id
        self.vdi = vdi
        self.sr = sr
        self.base = base
        self.created = created if created is not None else time.time()
        self.expires = expires if expires is not None else self.created + DEFAULT_TTL
        self.max_connections = max_connections
        self.revoked = False
        self.connections = 0
        self.expiry_notified = False

    def expired(self, now=None):
        return (now if now is not None else time.time()) >= self.expires

    def usable(self, now=None):
        return not self.revoked and not self.expired(now)

    def to_dict(self):
        return {
            "id": self.id,
            "vdi": self.vdi,
            "sr": self.sr,
            "base": self.base,
            "created": self.created,
            "expires": self.expires,
            "max_connections": self.max_connections,
            "revoked": self.revoked,
            "connections": self.connections,
        }


def new_ticket_id():
    return binascii.hexlify(os.urandom(16)).decode("ascii")


class TicketStore(object):
    """Thread-safe ticket registry with connection accounting."""

    def __init__(self, clock=time.time):
        self._lock = threading.Lock()
        self._tickets = {}
        self._listeners = []
        self.clock = clock

    def add_listener(self, fn):
        """fn(ticket) is called (outside the lock) when a ticket is revoked or expires."""
        self._listeners.append(fn)

    def _notify(self, tickets):
        for t in tickets:
            for fn in list(self._listeners):
                try:
                    fn(t)
                except Exception:
                    log.exception("ticket listener failed for %s", log_id(t.id))

    def create(
        self, vdi, sr=None, base=None, ttl=DEFAULT_TTL, max_connections=DEFAULT_MAX_CONNECTIONS
    ):
        ttl = float(ttl)
        if not 0 < ttl <= MAX_TTL:
            raise ValueError("ttl must be in (0, %d] seconds, got %r" % (MAX_TTL, ttl))
        max_connections = int(max_connections)
        if not 1 <= max_connections <= 1024:
            raise ValueError("max_connections must be in 1..1024, got %r" % max_connections)
        now = self.clock()
        ticket = Ticket(new_ticket_id(), vdi, sr, base, now, now + ttl, max_connections)
        with self._lock:
            self._tickets[ticket.id] = ticket
        return ticket

    def get(self, ticket_id):
        """The usable ticket with this id, or raise TicketError."""
        with self._lock:
            t = self._tickets.get(ticket_id)
        if t is None:
            raise TicketError("unknown ticket")
        if t.revoked:
            raise TicketError("ticket revoked")
        if t.expired(self.clock()):
            raise TicketError("ticket expired")
        return t

    def acquire(self, ticket_id):
        """Count one more connection on the ticket (TicketError if unusable or full)."""
        with self._lock:
            t = self._tickets.get(ticket_id)
            if t is None:
                raise TicketError("unknown ticket")
            if t.revoked:
                raise TicketError("ticket revoked")
            if t.expired(self.clock()):
                raise TicketError("ticket expired")
            if t.connections >= t.max_connections:
                raise TicketError("ticket has %d connections already" % t.connections)
            t.connections += 1
            return t

    def release(self, ticket_id):
        with self._lock:
            t = self._tickets.get(ticket_id)
            if t is not None and t.connections > 0:
                t.connections -= 1

    def list(self):
        with self._lock:
            return list(self._tickets.values())

    def revoke(self, ticket_id):
        with self._lock:
            t = self._tickets.get(ticket_id)
            if t is None:
                raise TicketError("unknown ticket")
            already = t.revoked
            t.revoked = True
        if not already:
            self._notify([t])
        return t

    def expire(self, now=None, keep=3600):
        """Notify listeners of tickets that expired since the last call; forget tickets that are
        dead (expired or revoked) for more than `keep` seconds and have no connections."""
        now = self.clock() if now is None else now
        newly = []
        with self._lock:
            for tid, t in list(self._tickets.items()):
                if t.expired(now) and not t.expiry_notified:
                    t.expiry_notified = True
                    newly.append(t)
                if (t.revoked or t.expired(now)) and t.connections == 0 and now - t.expires > keep:
                    del self._tickets[tid]
        self._notify(newly)
        return newly


class Reaper(object):
    """Background thread calling store.expire() every `interval` seconds."""

    def __init__(self, store, interval=1.0):
        self.store = store
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticket-reaper", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.store.expire()
            except Exception:
                log.exception("ticket reaper")

    def stop(self):
        self._stop.set()
        self._thread.join(5)


# --- admin API --------------------------------------------------------------------------------


def peer_uid(sock):
    """uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class AdminServer(object):
    """JSON-lines admin API on a Unix socket; one thread per client (few, local)."""

    def __init__(self, path, handler, allowed_uids=None):
        self.path = path
        self.handler = handler  # handler(request dict) -> response dict (raises for errors)
        self.allowed_uids = set(allowed_uids if allowed_uids is not None else (0, os.getuid()))
        self._sock = None
        self._stop = threading.Event()
        self._thread = None
        self._clients = set()
        self._lock = threading.Lock()

    def start(self):
        d = os.path.dirname(self.path)
        if d and not os.path.isdir(d):
            os.makedirs(d, 0o700)
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # stale socket of a dead agent
            else:
                raise OSError("admin socket %s is in use by a running agent" % self.path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="admin-accept", daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("admin accept")
                continue
            try:
                threading.Thread(
                    target=self._serve, args=(client,), name="admin-client", daemon=True
                ).start()
            except RuntimeError:  # cannot start a thread (out of threads/memory): refuse this
                log.error("admin: cannot start a thread for a client; closing it")  # client only
                client.close()

    def _serve(self, client):
        with self._lock:
            self._clients.add(client)
        try:
            uid = peer_uid(client)
            if uid not in self.allowed_uids:
                log.warning("admin: refused peer uid %d", uid)
                client.sendall(_dump({"ok": False, "error": "permission denied (uid %d)" % uid}))
                return
            client.settimeout(300)
            buf = b""
            while not self._stop.is_set():
                data = client.recv(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        client.sendall(_dump(self._handle_line(line)))
                if len(buf) > MAX_LINE:
                    client.sendall(_dump({"ok": False, "error": "request line too long"}))
                    return
        except (OSError, socket.timeout):
            pass
        finally:
            with self._lock:
                self._clients.discard(client)
            client.close()

    def _handle_line(self, line):
        try:
            req = json.loads(line.decode("utf-8"))
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("request must be a JSON object with an 'op'")
        except ValueError as exc:
            return {"ok": False, "error": "bad request: %s" % exc}
        try:
            resp = self.handler(req)
        except Exception as exc:  # every failure becomes one line for the caller
            if not isinstance(exc, (ValueError, LookupError, TicketError, OSError)):
                log.exception("admin %s", req.get("op"))
            return {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
        out = {"ok": True}
        out.update(resp or {})
        return out

    def stop(self):
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _dump(obj):
    return (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8")


def admin_call(path, request, timeout=30):
    """One request to a running agent's admin socket; returns the response dict."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        try:
            sock.sendall(_dump(request))
        except (BrokenPipeError, ConnectionResetError):
            # The agent may answer and close before reading (a refused peer): its answer, if
            # any, is still there to read.
            pass
        buf = b""
        while b"\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise OSError("agent closed the admin connection")
            buf += data
        return json.loads(buf.split(b"\n", 1)[0].decode("utf-8"))
    finally:
        sock.close()
