"""The agent's NBD export read with libnbd: multi-conn, aio, block status, pinned TLS.

Full backup: ``base:allocation`` says which blocks hold data (holes are never read).
Incremental (a ticket with a base): ``fastpath:changed`` says which blocks differ from the base.
A block list from elsewhere (CBT) overrides both.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlparse

from orchestrator.sources.base import BLOCK_SIZE, DiskPlan, SourceError
from orchestrator.sources.nbdclient import (
    CONTEXT_ALLOCATION,
    CONTEXT_CHANGED,
    STATE_ZERO,
    NbdBlockReader,
    NbdEndpoint,
    NbdSource,
    TlsConfig,
    _close_handle,
    block_status_blocks,
)


class AgentNbdSource(NbdSource):
    name = "nbd"

    def __init__(
        self,
        host: str,
        port: int,
        export: str,
        *,
        fingerprint: str | None = None,
        tls: bool = True,
        incremental: bool = False,
        connections: int = 4,
        depth: int = 8,
        retries: int = 3,
        backoff: float = 0.5,
        max_in_flight: int = 16,
        io_timeout: float = 60.0,
    ):
        super().__init__(max_in_flight=max_in_flight)
        self.io_timeout = io_timeout
        self.host, self.port, self.export = host, int(port), export
        self.fingerprint = fingerprint
        self.use_tls = tls
        self.incremental = incremental
        self.connections = max(1, connections)
        self.depth = depth
        self.retries = retries
        self.backoff = backoff

    @classmethod
    def from_plugin(cls, export: dict, **kw) -> AgentNbdSource:
        """From the plugin's open_export answer (its ``nbd`` part, TLS mode and fingerprint)."""
        nbd = export.get("nbd") or {}
        if not nbd.get("port"):
            raise SourceError("the agent did not offer NBD for this export")
        return cls(
            nbd["host"],
            int(nbd["port"]),
            nbd.get("export_name") or export["ticket"],
            fingerprint=export.get("fingerprint"),
            tls=export.get("tls", "require") != "off",
            incremental=bool(export.get("base")),
            **kw,
        )

    @classmethod
    def from_url(cls, url: str, **kw) -> AgentNbdSource:
        """``nbd://host:port/export`` or ``nbds://…`` (then ``fingerprint=`` is required)."""
        u = urlparse(url)
        if u.scheme not in ("nbd", "nbds") or not u.hostname:
            raise SourceError(f"{url}: not an nbd:// or nbds:// URL")
        tls = u.scheme == "nbds"
        if tls and not kw.get("fingerprint"):
            raise SourceError(f"{url}: nbds:// needs --fingerprint (the agent's certificate)")
        return cls(u.hostname, u.port or 10810, u.path.lstrip("/"), tls=tls, **kw)

    def describe(self) -> str:
        return f"agent NBD {'nbds' if self.use_tls else 'nbd'}://{self.host}:{self.port}"

    def open(self, blocks: Sequence[int] | None = None) -> DiskPlan:
        if self.use_tls:
            if not self.fingerprint:
                raise SourceError(f"{self.describe()}: TLS without a certificate fingerprint")
            self._tls = TlsConfig.pinned(self.host, self.port, self.fingerprint)
        ep = NbdEndpoint(
            self.host,
            self.port,
            self.export,
            tls=self._tls,
            contexts=(CONTEXT_ALLOCATION, CONTEXT_CHANGED),
            timeout=self.io_timeout,
        )
        h = ep.handle()
        try:
            size = h.get_size()
            notes = []
            if blocks is not None:
                todo = sorted(set(blocks))
                incremental = True
            elif self.incremental:
                if not h.can_meta_context(CONTEXT_CHANGED):
                    raise SourceError(f"{self.describe()}: no {CONTEXT_CHANGED} for an incremental")
                todo = block_status_blocks(
                    h, size, BLOCK_SIZE, CONTEXT_CHANGED, lambda f: f & 1, self.io_timeout
                )
                incremental = True
            elif h.can_meta_context(CONTEXT_ALLOCATION):
                todo = block_status_blocks(
                    h,
                    size,
                    BLOCK_SIZE,
                    CONTEXT_ALLOCATION,
                    lambda f: not (f & STATE_ZERO),
                    self.io_timeout,
                )
                incremental = False
            else:
                todo = list(range(-(-size // BLOCK_SIZE)))
                incremental = False
                notes.append("no base:allocation on this server: every block is read")
            if not h.can_multi_conn():
                self.connections = 1
                notes.append("server does not allow multi-conn: one connection")
        except BaseException:
            _close_handle(h)
            raise
        self._reader = NbdBlockReader(
            ep,
            size,
            BLOCK_SIZE,
            depth=self.depth,
            retries=self.retries,
            backoff=self.backoff,
            first_handle=h,
        )
        self.plan = DiskPlan(size, BLOCK_SIZE, todo, incremental, self.name, notes)
        return self.plan
