"""XAPI's own NBD (``VDI.get_nbd_info``, xapi-nbd) with CBT for incrementals.

For hosts without the agent. xapi-nbd serves the raw disk (no block status, no multi-conn, one
request at a time), so a full backup reads every block (zero blocks are dropped by the pipeline)
and an incremental needs CBT: ``VDI.list_changed_blocks(base, snapshot)`` gives one bit per
64 KiB, folded to 2 MiB blocks. TLS is verified against the certificate XAPI returns in the NBD
info (``cert``), the only CA libnbd trusts for the connection.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from orchestrator.sources.base import (
    BLOCK_SIZE,
    DiskPlan,
    SourceUnavailable,
    fold_cbt_bitmap,
)
from orchestrator.sources.nbdclient import (
    NbdBlockReader,
    NbdEndpoint,
    NbdSource,
    TlsConfig,
    _close_handle,
)


def changed_blocks_cbt(xenapi, base_ref: str, snap_ref: str, size: int) -> list[int]:
    bitmap = base64.b64decode(xenapi.VDI.list_changed_blocks(base_ref, snap_ref))
    return fold_cbt_bitmap(bitmap, size)


class XapiNbdSource(NbdSource):
    name = "xapi-nbd"

    def __init__(
        self,
        xenapi,
        vdi_ref: str,
        *,
        connections: int = 4,
        retries: int = 3,
        backoff: float = 0.5,
        max_in_flight: int = 16,
        io_timeout: float = 60.0,
        prefer_address: str | None = None,
    ):
        super().__init__(max_in_flight=max_in_flight)
        self.io_timeout = io_timeout
        self.xenapi = xenapi
        self.vdi_ref = vdi_ref
        # XAPI lists one endpoint per host that has the VDI's SR attached: take this host's
        # (the one the disk is routed to) when it is among them, else the first.
        self.prefer_address = prefer_address
        self.connections = connections
        self.retries = retries
        self.backoff = backoff
        self.info: dict | None = None

    def describe(self) -> str:
        if self.info:
            return f"xapi-nbd {self.info['address']}:{self.info['port']}"
        return "xapi-nbd"

    def open(self, blocks: Sequence[int] | None = None) -> DiskPlan:
        infos = self.xenapi.VDI.get_nbd_info(self.vdi_ref)
        if not infos:
            raise SourceUnavailable("XAPI offers no NBD endpoint for this VDI (no NBD network?)")
        preferred = [i for i in infos if i.get("address") == self.prefer_address]
        self.info = info = (preferred or infos)[0]
        if info.get("cert"):
            self._tls = TlsConfig(info["cert"])
        ep = NbdEndpoint(
            info["address"],
            int(info["port"]),
            info["exportname"],
            tls=self._tls,
            structured=False,
            timeout=self.io_timeout,
        )
        h = ep.handle()
        try:
            size = h.get_size()
        except BaseException:
            _close_handle(h)
            raise
        if blocks is None:
            todo = list(range(-(-size // BLOCK_SIZE)))
            notes = ["xapi-nbd has no block status: every block is read"]
            incremental = False
        else:
            todo, notes, incremental = sorted(set(blocks)), [], True
        self._reader = NbdBlockReader(
            ep,
            size,
            BLOCK_SIZE,
            depth=1,
            retries=self.retries,
            backoff=self.backoff,
            first_handle=h,
        )
        self.plan = DiskPlan(size, BLOCK_SIZE, todo, incremental, self.name, notes)
        return self.plan
