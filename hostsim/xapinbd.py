"""An NBD endpoint like xapi-nbd, so comparisons with it are fair to what users have today.

What xapi-nbd offers: fixed newstyle handshake; options EXPORT_NAME, STARTTLS, LIST, ABORT only (GO,
INFO, STRUCTURED_REPLY, meta contexts: unsupported, so clients fall back to EXPORT_NAME); the export
name is `/<vdi-uuid>?session_id=<ref>`; TLS with the host certificate; raw content; simple replies only,
no block status, no multi-conn; requests served one at a time. Written here on its own (not agent/nbd)
on purpose. In a pool of several hosts each host runs its own (``host``): it serves only the VDIs of
SRs attached to that host, as a real host's xapi-nbd can only read what is plugged there.
"""

import logging
import socket
import ssl
import struct
import threading
import urllib.parse

from hostsim.errors import XapiError

log = logging.getLogger("hostsim.xapinbd")

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
CLIENT_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5

REP_ACK = 1
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5

CMD_READ = 0
CMD_DISC = 2
CMD_FLUSH = 3

TFLAG_HAS_FLAGS = 1
TFLAG_READ_ONLY = 2
TFLAG_SEND_FLUSH = 4

EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28

MAX_OPTION = 64 * 1024
MAX_READ = 32 << 20
MAX_CONNECTIONS = 16


class _Closed(Exception):
    pass


def _recv(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise _Closed()
        buf.extend(chunk)
    return bytes(buf)


class XapiNbdServer:
    def __init__(self, listen, pool, tls_context=None, require_tls=True, host=None):
        self.pool = pool
        self.host = host  # host ref: serve only its SRs' VDIs (None: every SR of the pool)
        self.tls_context = tls_context
        self.require_tls = require_tls and tls_context is not None
        self.sock = socket.create_server(listen, reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self.thread = None
        self.stopping = False
        self.active = 0
        self.lock = threading.Lock()
        self.requests_served = 0

    def start(self):
        self.thread = threading.Thread(target=self._accept, name="xapi-nbd", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self.active >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self.active += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(300)
        try:
            self._session(conn)
        except (_Closed, OSError, ssl.SSLError) as e:
            log.debug("xapi-nbd connection ended: %s", e)
        finally:
            with self.lock:
                self.active -= 1
            try:
                conn.close()
            except OSError:
                pass

    def _session(self, sock):
        sock.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", _recv(sock, 4))
        no_zeroes = bool(cflags & CLIENT_NO_ZEROES)
        tls = False
        while True:
            magic, opt, length = struct.unpack(">QII", _recv(sock, 16))
            if magic != IHAVEOPT or length > MAX_OPTION:
                return
            data = _recv(sock, length)
            if opt == OPT_EXPORT_NAME:
                if self.require_tls and not tls:
                    return  # EXPORT_NAME cannot carry an error reply: hang up
                target = self._resolve(data.decode("utf-8", "replace"))
                if target is None:
                    return
                uuid, size = target
                sock.sendall(
                    struct.pack(">QH", size, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH)
                )
                if not no_zeroes:
                    sock.sendall(bytes(124))
                return self._transmission(sock, uuid, size)
            if opt == OPT_ABORT:
                self._reply(sock, opt, REP_ACK)
                return
            if opt == OPT_STARTTLS:
                if tls or self.tls_context is None or length:
                    self._reply(sock, opt, REP_ERR_INVALID if tls or length else REP_ERR_UNSUP)
                    continue
                self._reply(sock, opt, REP_ACK)
                sock = self.tls_context.wrap_socket(sock, server_side=True)
                tls = True
                continue
            if self.require_tls and not tls:
                self._reply(sock, opt, REP_ERR_TLS_REQD)
                continue
            if opt == OPT_LIST:
                # xapi-nbd cannot list exports without a session: an empty list.
                self._reply(sock, opt, REP_ACK)
                continue
            self._reply(sock, opt, REP_ERR_UNSUP)

    def _reply(self, sock, opt, rep, data=b""):
        sock.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, rep, len(data)) + data)

    def _resolve(self, name):
        """/<vdi-uuid>?session_id=<ref> -> (vdi uuid, size), or None when refused."""
        url = urllib.parse.urlsplit(name)
        uuid = url.path.lstrip("/")
        session = dict(urllib.parse.parse_qsl(url.query)).get("session_id", "")
        api = self.pool.api
        try:
            api._session(session)
            ref = api.store.by_uuid_ref("VDI", uuid)
            rec = api.store.get("VDI", ref)
        except XapiError as e:
            log.info("xapi-nbd refused %r: %s", name, e)
            return None
        if self.host is not None and self.host not in api.hosts_seeing([rec["SR"]]):
            log.info("xapi-nbd refused %r: its SR is not attached to this host", name)
            return None
        if rec["type"] == "cbt_metadata":
            return None
        return uuid, rec["virtual_size"]

    def _transmission(self, sock, uuid, size):
        api = self.pool.api
        try:  # the SR the VDI lives on (one backend per SR: several in a pool of hosts)
            sr = api._vdi_backend(api.store.by_uuid_ref("VDI", uuid))
        except XapiError:
            return
        while True:
            magic, _flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", _recv(sock, 28))
            if magic != REQUEST_MAGIC:
                return
            if cmd == CMD_DISC:
                return
            if cmd == CMD_READ:
                if length > MAX_READ or offset + length > size:
                    sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EINVAL, handle))
                    continue
                try:
                    data = sr.read(uuid, offset, length)
                except XapiError:
                    sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EIO, handle))
                    continue
                sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + data)
                self.requests_served += 1
                continue
            if cmd == CMD_FLUSH:
                sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
                continue
            if cmd == 1:  # WRITE: read-only export; swallow the payload
                _recv(sock, length) if length <= MAX_READ else None
                sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EPERM, handle))
                continue
            sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EINVAL, handle))
