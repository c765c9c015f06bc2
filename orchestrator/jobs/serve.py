"""``fastpath serve REPO ID [--disk UUID] [--listen HOST:PORT] [--tls off|require ...]``.

A read-only NBD export of a restore point straight from the repository (local or S3): nothing
is restored first, a client reads any offset and gets the chunks it touches, fetched, verified
and decoded on demand (``orchestrator/serve/``). The NBD side is the agent's server
(``agent.nbd``: fixed newstyle, structured replies, ``base:allocation`` and ``fastpath:changed``
block status, CAN_MULTI_CONN, STARTTLS), fed with :class:`~orchestrator.serve.export.PointExports`
in place of tickets, so ``nbdcopy``, ``qemu-img``, ``nbdinfo``, ``qemu-nbd``, ``nbdfuse`` and
``guestfish`` read a backup as a disk.

Export names: each disk's VDI uuid; ``""`` (``nbd://HOST:PORT``) is ``--disk`` or the only disk.
When the server listens, one line goes to stderr (and, with ``--json``, one JSON object to
stdout) with the address and URIs; SIGINT/SIGTERM stop it (exit 0). S3 reads go through the
repository's retry policy (the backend's), like every other read.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING

from orchestrator.cliutil import UsageError, add_repo_argument, open_repo

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("fastpath.serve")

DEFAULT_LISTEN = "127.0.0.1:10809"


def register(registry) -> None:
    p = registry.add("serve", run_serve, help="serve a restore point over NBD (read-only)")
    add_repo_argument(p)
    p.add_argument("id", metavar="ID", help="<vm>/<time>, <vm>/latest or latest")
    p.add_argument("--disk", metavar="UUID", help="the default export (a VDI uuid of the point)")
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    p.add_argument("--tls", choices=("off", "require"), default="off", help="NBD TLS mode")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate (with --tls require)")
    p.add_argument("--tls-key", metavar="PEM", help="server key (with --tls require)")
    p.add_argument(
        "--cache-mib",
        type=int,
        default=256,
        metavar="N",
        help="decoded chunks kept in memory, per disk (MiB, default 256)",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=8,
        metavar="N",
        help="chunks read ahead for sequential readers (default 8; 0: none)",
    )
    p.add_argument("--threads", type=int, default=8, help="parallel chunk fetches per disk")
    p.add_argument(
        "--max-connections", type=int, default=64, metavar="N", help="NBD connections at most"
    )


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def ssl_context(args) -> ssl.SSLContext | None:
    import ssl  # here: every command would pay for it

    if args.tls == "off":
        if args.tls_cert or args.tls_key:
            raise UsageError("--tls-cert/--tls-key need --tls require")
        return None
    if not args.tls_cert:
        raise UsageError("--tls require needs --tls-cert PEM (and --tls-key PEM)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--tls-cert/--tls-key: {exc}") from None
    return ctx


class PointServer:
    """The exports of one restore point on the agent's NBD server (used by the command and the
    tests): ``start()``, ``address``, ``uri(name)``, ``stop()``."""

    def __init__(
        self,
        repo,
        point,
        *,
        disk: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_mode: str = "off",
        ssl_context=None,
        cache_bytes: int = 256 << 20,
        prefetch: int = 8,
        threads: int = 8,
        max_connections: int = 64,
    ):
        from agent.nbd.server import NBDServer
        from orchestrator.serve.export import PointExports

        disks = sorted(point.disks)
        if not disks:
            raise UsageError(f"restore point {point.id} has no disk")
        if disk is not None and disk not in point.disks:
            raise UsageError(
                f"restore point {point.id} has no disk {disk} (disks: {', '.join(disks)})"
            )
        default = disk if disk is not None else (disks[0] if len(disks) == 1 else None)
        self.repo = repo
        self.point = point
        self.names = PointExports(disks, default)
        self.default = default
        self._options = {"cache_bytes": cache_bytes, "prefetch": prefetch, "threads": threads}
        self._exports: dict[str, object] = {}
        self._lock = threading.Lock()
        self.nbd = NBDServer(
            self.names,
            self._open,
            host=host,
            port=port,
            tls_mode=tls_mode,
            ssl_context=ssl_context,
            max_connections=max_connections,
            list_exports=True,
            # The agent's defaults suit a client on the wire; a restore point served to one
            # person may sit idle a long while between reads (a mounted filesystem).
            idle_timeout=24 * 3600.0,
        )

    def _open(self, name):
        from orchestrator.serve.export import PointExport

        vdi = name.vdi
        with self._lock:
            export = self._exports.get(vdi)
            if export is None:
                doc = self.repo.read_metadata(self.point)  # checked against it when encrypted
                index = self.repo.read_point_index(self.point, doc, vdi)
                export = PointExport(
                    self.repo, index, name=vdi, point_id=self.point.id, **self._options
                )
                self._exports[vdi] = export
            return export

    def start(self) -> PointServer:
        self.nbd.start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.nbd.address

    def uri(self, name: str = "", tls: bool = False) -> str:
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"nbd{'s' if tls else ''}://{host}:{port}/{name}"

    def stats(self) -> dict:
        out = self.nbd.stats()
        with self._lock:
            out["disks"] = {
                vdi: {**e.cache.stats, "cached_bytes": e.cache.cached_bytes}
                for vdi, e in self._exports.items()
            }
        return out

    def stop(self) -> None:
        self.nbd.stop()
        with self._lock:
            exports, self._exports = list(self._exports.values()), {}
        for e in exports:
            e.shutdown()


def run_serve(args, ui):
    from agent.signalstop import SignalStop

    host, port = parse_listen(args.listen)
    ctx = ssl_context(args)
    if args.cache_mib < 0 or args.prefetch < 0 or args.threads < 1:
        raise UsageError("--cache-mib and --prefetch must be >= 0, --threads >= 1")
    stop = SignalStop()
    previous = stop.install(signal.SIGINT, signal.SIGTERM)
    try:
        with open_repo(args) as repo:
            point = repo.resolve(args.id)
            server = PointServer(
                repo,
                point,
                disk=args.disk,
                host=host,
                port=port,
                tls_mode=args.tls,
                ssl_context=ctx,
                cache_bytes=args.cache_mib << 20,
                prefetch=args.prefetch,
                threads=args.threads,
                max_connections=args.max_connections,
            )
            try:
                server.start()
            except OSError as exc:
                raise OSError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
            tls = args.tls != "off"
            ready = {
                "ok": True,
                "id": point.id,
                "listen": "%s:%d" % server.address,
                "tls": args.tls,
                "default_export": server.default,
                "exports": {vdi: server.uri(vdi, tls) for vdi in sorted(point.disks)},
                "uri": server.uri("", tls) if server.default else None,
            }
            if args.json:
                print(json.dumps(ready, sort_keys=True), flush=True)
            ui.log(
                f"serving {point.id} on {ready['listen']} (tls {args.tls}): "
                + ", ".join(ready["exports"].values())
            )
            try:
                while not stop.wait():
                    pass
            finally:
                stats = server.stats()
                server.stop()
            ui.log(
                "stopped: %d connection(s), %d request error(s)"
                % (stats.get("connections", 0), stats.get("request_errors", 0))
            )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    sys.stdout.flush()
    return None
