"""`fastpath-agent serve` and `fastpath-agent ticket ...`: the agent daemon and its admin client.

    fastpath-agent serve [--config FILE] [--sr-root DIR]... [--nbd-listen HOST:PORT]
                         [--http-listen HOST:PORT] [--admin-socket PATH] [--tls off|optional|require]
                         [--tls-cert PEM] [--tls-key PEM] [--tls-client-ca PEM] [--ready-file PATH]
    fastpath-agent ticket create --vdi UUID [--sr UUID] [--base UUID] [--ttl SECONDS]
                                 [--max-connections N] [--admin-socket PATH] [--json]
    fastpath-agent ticket list [--admin-socket PATH] [--json]
    fastpath-agent ticket revoke ID [--admin-socket PATH] [--json]

agent/cli.py calls register(subparsers); `python -m agent.daemon ...` works on its own too.
--ready-file PATH: once every listener is up, the daemon writes there a JSON object with the bound
addresses ({"pid", "nbd": [host, port], "admin_socket", "http": [host, port], "tls"}), so tests and
hostsim can bind port 0.
"""

import argparse
import hashlib
import json
import logging
import os
import signal
import ssl
import sys
import threading

from agent import config as config_mod
from agent import sr as sr_mod
from agent import tickets as tickets_mod
from agent.export import Counters
from agent.http.limits import Limits
from agent.http.metrics import prometheus_lines
from agent.http.server import HttpServer
from agent.nbd.server import NBDServer
from agent.signalstop import SignalStop

log = logging.getLogger("fastpath.agent")


def build_ssl_context(cfg):
    if cfg.tls_mode == "off":
        return None
    if not cfg.tls_cert:
        raise config_mod.ConfigError("tls mode %s needs a certificate ([tls] cert)" % cfg.tls_mode)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 at least (proto.md); minimum_version is 3.7+, so use the option bits.
    ctx.options |= getattr(ssl, "OP_NO_TLSv1", 0) | getattr(ssl, "OP_NO_TLSv1_1", 0)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
    if cfg.tls_client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=cfg.tls_client_ca)
    return ctx


def cert_fingerprint(path):
    """SHA-256 fingerprint of the first certificate in a PEM file (what the plugin hands out)."""
    with open(path) as f:
        pem = f.read()
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        return None
    der = ssl.PEM_cert_to_DER_cert(pem[start : end + len("-----END CERTIFICATE-----")])
    return hashlib.sha256(der).hexdigest()


class Agent(object):
    """Everything `serve` runs: SR resolver, tickets + reaper, NBD and HTTP servers, admin API."""

    def __init__(self, cfg, reaper_interval=1.0):
        self.cfg = cfg
        self.sr = sr_mod.from_config(cfg)
        self.tickets = tickets_mod.TicketStore()
        self.counters = Counters()
        self.reaper = tickets_mod.Reaper(self.tickets, reaper_interval)
        self.ssl_context = build_ssl_context(cfg)
        self.fingerprint = cert_fingerprint(cfg.tls_cert) if self.ssl_context else None
        self.nbd = NBDServer(
            self.tickets,
            self._open_export,
            host=cfg.nbd_listen[0],
            port=cfg.nbd_listen[1],
            tls_mode=cfg.tls_mode,
            ssl_context=self.ssl_context,
            counters=self.counters,
            max_connections=cfg.max_connections,
            max_inflight=cfg.max_inflight,
            workers=cfg.workers,
            handshake_timeout=cfg.handshake_timeout,
            idle_timeout=cfg.idle_timeout,
            list_exports=cfg.list_exports,
            max_descriptors=cfg.max_block_status_descriptors,
            max_handshakes=cfg.max_handshakes,
            max_handshakes_per_address=cfg.max_handshakes_per_address,
        )
        # Same tickets, exports, counters and TLS settings as NBD; /metrics also shows NBD's.
        self.http = HttpServer(
            cfg.http_listen,
            self.tickets,
            self._open_export,
            tls_context=self.ssl_context,
            tls_mode=cfg.tls_mode,
            limits=Limits(
                max_connections=cfg.http_max_connections,
                header_timeout=cfg.http_header_timeout,
                idle_timeout=cfg.http_idle_timeout,
                send_timeout=cfg.http_send_timeout,
                max_unauthenticated=cfg.http_max_unauthenticated,
                max_unauthenticated_per_address=cfg.http_max_unauthenticated_per_address,
                unauthenticated_timeout=cfg.http_unauthenticated_timeout,
            ),
            metrics_extra=lambda: prometheus_lines("fastpath_nbd", self.nbd.stats()),
        )
        self.admin = tickets_mod.AdminServer(cfg.admin_socket, self.handle_admin)
        self._stopped = threading.Event()

    def _open_export(self, ticket):
        return self.sr.open_export(
            ticket.vdi, ticket.sr, ticket.base, counters=self.counters, name=ticket.id
        )

    def start(self):
        started = []
        try:
            for server in (self.nbd, self.http, self.admin):
                server.start()
                started.append(server)
        except BaseException:
            for server in reversed(started):
                server.stop()
            raise
        self.reaper.start()
        return self

    def stop(self):
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.reaper.stop()
        self.admin.stop()
        self.http.stop()
        self.nbd.stop()

    def addresses(self):
        host, port = self.nbd.address
        return {
            "pid": os.getpid(),
            "nbd": [host, port],
            "http": list(self.http.address),
            "admin_socket": self.cfg.admin_socket,
            "tls": self.cfg.tls_mode,
            "fingerprint": self.fingerprint,
        }

    # -- admin API -------------------------------------------------------------------------------

    def handle_admin(self, req):
        op = req["op"]
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "create_ticket":
            return self._create_ticket(req)
        if op == "list_tickets":
            return {"tickets": [t.to_dict() for t in self.tickets.list()]}
        if op == "revoke_ticket":
            tid = req.get("id")
            if not isinstance(tid, str):
                raise ValueError("revoke_ticket needs an 'id'")
            return {"ticket": self.tickets.revoke(tid).to_dict()}
        if op == "stats":
            stats = self.nbd.stats()
            stats["tickets"] = len(self.tickets.list())
            return {"stats": stats}
        raise ValueError("unknown op %r" % op)

    def _create_ticket(self, req):
        vdi = sr_mod.check_uuid(req.get("vdi"), "VDI")
        sr = req.get("sr")
        base = req.get("base")
        if sr is not None:
            sr_mod.check_uuid(sr, "SR")
        if base is not None:
            sr_mod.check_uuid(base, "base VDI")
        # Validate now (chain opens, base is an ancestor), so a bad request fails here and not
        # on the client's first connection.
        export = self.sr.open_export(vdi, sr, base)
        size = export.size
        export.close()
        ticket = self.tickets.create(
            vdi,
            sr,
            base,
            ttl=req.get("ttl", tickets_mod.DEFAULT_TTL),
            max_connections=req.get("max_connections", tickets_mod.DEFAULT_MAX_CONNECTIONS),
        )
        host, port = self.nbd.address
        http_host, http_port = self.http.address
        scheme = "nbd" if self.cfg.tls_mode == "off" else "nbds"
        log.info(
            "ticket %s created for VDI %s (base %s)",
            tickets_mod.log_id(ticket.id),
            vdi,
            base or "-",
        )
        return {
            "ticket": ticket.to_dict(),
            "export_name": ticket.id,
            "size": size,
            "nbd": {
                "host": host,
                "port": port,
                "uri": "%s://%s:%d/%s" % (scheme, host, port, ticket.id),
            },
            "http": {
                "host": http_host,
                "port": http_port,
                "url": "%s://%s:%d/v1/exports/%s"
                % (
                    "http" if self.cfg.tls_mode == "off" else "https",
                    http_host,
                    http_port,
                    ticket.id,
                ),
            },
            "tls": self.cfg.tls_mode,
            "fingerprint": self.fingerprint,
        }


# --- command line ---------------------------------------------------------------------------------


def _write_ready(path, info):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, path)


class OneLineFormatter(logging.Formatter):
    """Every record is one line: control characters in what clients and SR files control (export
    names, locator strings, request paths) are escaped, so nobody forges a log line. A
    traceback keeps its lines, indented under the record."""

    _ESCAPES = {i: "\\x%02x" % i for i in list(range(32)) + [127] if i != 9}

    def formatMessage(self, record):
        return super(OneLineFormatter, self).formatMessage(record).translate(self._ESCAPES)

    def formatException(self, ei):
        return "    " + super(OneLineFormatter, self).formatException(ei).replace("\n", "\n    ")


def setup_logging(level):
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def cmd_serve(args):
    setup_logging(args.log_level)
    try:
        cfg = config_mod.load(
            args.config,
            sr_roots=args.sr_root or None,
            nbd_listen=config_mod.parse_listen(args.nbd_listen, "--nbd-listen")
            if args.nbd_listen
            else None,
            http_listen=config_mod.parse_listen(args.http_listen, "--http-listen")
            if args.http_listen
            else None,
            admin_socket=args.admin_socket,
            tls_mode=args.tls,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            idle_timeout=args.idle_timeout,
            handshake_timeout=args.handshake_timeout,
            max_connections=args.max_connections,
            list_exports=True if args.list_exports else None,
            sm_lock_dir=args.sm_lock_dir,
        )
    except config_mod.ConfigError as exc:
        sys.stderr.write("fastpath-agent: %s\n" % exc)
        return 2
    try:
        agent = Agent(cfg).start()
    except (OSError, ssl.SSLError, config_mod.ConfigError) as exc:
        sys.stderr.write("fastpath-agent: cannot start: %s\n" % exc)
        return 1
    # Not a threading.Event: setting one from a signal handler deadlocks when the signal lands
    # while the main thread holds its lock (in wait(), or in a first handler: `kill; kill`).
    stop = SignalStop()
    stop.install(signal.SIGTERM, signal.SIGINT)
    info = agent.addresses()
    log.info("agent ready: %s", json.dumps(info, sort_keys=True))
    if args.ready_file:
        _write_ready(args.ready_file, info)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        agent.stop()
        log.info("agent stopped")
        stop.close()
    return 0


def _admin(args, request):
    try:
        resp = tickets_mod.admin_call(args.admin_socket, request)
    except OSError as exc:
        sys.stderr.write(
            "fastpath-agent: cannot reach the agent at %s: %s\n" % (args.admin_socket, exc)
        )
        return None
    if not resp.get("ok"):
        sys.stderr.write("fastpath-agent: %s\n" % resp.get("error", "request failed"))
        return None
    return resp


def cmd_ticket_create(args):
    req = {"op": "create_ticket", "vdi": args.vdi}
    if args.sr:
        req["sr"] = args.sr
    if args.base:
        req["base"] = args.base
    if args.ttl is not None:
        req["ttl"] = args.ttl
    if args.max_connections is not None:
        req["max_connections"] = args.max_connections
    resp = _admin(args, req)
    if resp is None:
        return 1
    if args.json:
        print(json.dumps(resp, sort_keys=True))
    else:
        print(resp["export_name"])
        print(
            "  %s  (VDI %s, expires in %ds)"
            % (
                resp["nbd"]["uri"],
                resp["ticket"]["vdi"],
                int(resp["ticket"]["expires"] - resp["ticket"]["created"]),
            )
        )
    return 0


def cmd_ticket_list(args):
    resp = _admin(args, {"op": "list_tickets"})
    if resp is None:
        return 1
    if args.json:
        print(json.dumps(resp["tickets"], sort_keys=True))
        return 0
    for t in resp["tickets"]:
        state = "revoked" if t["revoked"] else "active"
        print(
            "%s  vdi=%s base=%s connections=%d/%d %s"
            % (t["id"], t["vdi"], t["base"] or "-", t["connections"], t["max_connections"], state)
        )
    return 0


def cmd_ticket_revoke(args):
    resp = _admin(args, {"op": "revoke_ticket", "id": args.id})
    if resp is None:
        return 1
    if args.json:
        print(json.dumps(resp["ticket"], sort_keys=True))
    else:
        print("revoked %s" % args.id)
    return 0


def register(subparsers):
    """Add `serve` and `ticket` to the fastpath-agent command."""
    dflt = config_mod.DEFAULTS
    p = subparsers.add_parser("serve", help="run the NBD (and HTTP) export servers")
    p.add_argument("--config", help="INI file (see agent/config.py)")
    p.add_argument(
        "--sr-root",
        action="append",
        help="SR mount root (repeatable; default %s)" % dflt["sr_roots"][0],
    )
    p.add_argument("--nbd-listen", metavar="HOST:PORT", help="default 0.0.0.0:10810")
    p.add_argument("--http-listen", metavar="HOST:PORT", help="default 0.0.0.0:8843")
    p.add_argument("--admin-socket", metavar="PATH", help="default %s" % dflt["admin_socket"])
    p.add_argument("--tls", choices=("off", "optional", "require"), help="default require")
    p.add_argument("--tls-cert", metavar="PEM")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--tls-client-ca", metavar="PEM", help="require and verify client certificates")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS")
    p.add_argument("--handshake-timeout", type=float, metavar="SECONDS")
    p.add_argument("--max-connections", type=int, metavar="N")
    p.add_argument(
        "--list-exports", action="store_true", help="answer NBD_OPT_LIST with the live tickets"
    )
    p.add_argument(
        "--sm-lock-dir",
        metavar="DIR",
        help="SM's lock directory, where exports pause the GC (default %s)" % dflt["sm_lock_dir"],
    )
    p.add_argument(
        "--ready-file", metavar="PATH", help="write the bound addresses as JSON once listening"
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    t = subparsers.add_parser(
        "ticket", help="create, list or revoke export tickets (talks to the agent)"
    )
    tsub = t.add_subparsers(dest="ticket_command", metavar="ACTION")
    tsub.required = True

    def common(sp):
        sp.add_argument("--admin-socket", default=dflt["admin_socket"], metavar="PATH")
        sp.add_argument("--json", action="store_true")

    c = tsub.add_parser("create", help="a new ticket for a VDI")
    c.add_argument("--vdi", required=True, metavar="UUID")
    c.add_argument("--sr", metavar="UUID")
    c.add_argument("--base", metavar="UUID", help="serve fastpath:changed relative to this VDI")
    c.add_argument("--ttl", type=float, metavar="SECONDS")
    c.add_argument("--max-connections", type=int, metavar="N")
    common(c)
    c.set_defaults(func=cmd_ticket_create)
    ls = tsub.add_parser("list", help="tickets of the running agent")
    common(ls)
    ls.set_defaults(func=cmd_ticket_list)
    r = tsub.add_parser("revoke", help="revoke a ticket and close its connections")
    r.add_argument("id")
    common(r)
    r.set_defaults(func=cmd_ticket_revoke)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        sys.exit(2)


def main(argv=None):
    parser = _Parser(prog="fastpath-agent", description="xcp-fastpath agent daemon")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
