"""The agent's HTTP transport: the framed ``/blocks`` stream, several streams in parallel.

The block list comes from ``/extents`` (allocation, or changed for a ticket with a base); the
blocks are then read by ``streams`` parallel GETs of ``/blocks?start=&count=`` over disjoint
block ranges, each decoded by ``agent.http.protocol.BlocksDecoder`` (which checks the framing, the
order and the end frame's counts and CRC). A broken stream is retried from the first block it did
not deliver. TLS is pinned by the fingerprint the plugin returned.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Sequence
from urllib.parse import urlparse

from agent.http import protocol as hp
from orchestrator.sources import httpclient
from orchestrator.sources.base import (
    BLOCK_SIZE,
    DiskPlan,
    Source,
    SourceError,
    Stopped,
    split_ranges,
)

READ_SIZE = 1 << 20


class AgentHttpSource(Source):
    name = "http"

    def __init__(
        self,
        url: str,
        *,
        fingerprint: str | None = None,
        incremental: bool = False,
        streams: int = 4,
        retries: int = 3,
        backoff: float = 0.5,
        max_in_flight: int = 16,
        io_timeout: float = 60.0,
    ):
        super().__init__(max_in_flight=max_in_flight)
        self.io_timeout = io_timeout
        u = urlparse(url)
        self.base_url = f"{u.scheme}://{u.netloc}"
        self.path = u.path.rstrip("/")  # /v1/exports/<ticket>
        self.fingerprint = fingerprint
        self.incremental = incremental
        self.streams = max(1, streams)
        self.retries = retries
        self.backoff = backoff
        self.info: dict | None = None

    @classmethod
    def from_plugin(cls, export: dict, **kw) -> AgentHttpSource:
        http = export.get("http") or {}
        if not http.get("port"):
            raise SourceError("the agent did not offer HTTP for this export")
        return cls(
            http["url"],
            fingerprint=export.get("fingerprint"),
            incremental=bool(export.get("base")),
            **kw,
        )

    def describe(self) -> str:
        return f"agent HTTP {self.base_url}"

    def _get_json(self, path: str):
        conn, resp = httpclient.get(
            self.base_url, path, fingerprint=self.fingerprint, timeout=self.io_timeout
        )
        try:
            return json.loads(resp.read())
        except ValueError as exc:
            raise SourceError(f"GET {path}: not JSON") from exc
        finally:
            conn.close()

    def open(self, blocks: Sequence[int] | None = None) -> DiskPlan:
        self.info = info = self._get_json(self.path)
        size, bs = int(info["size"]), int(info["block_size"])
        if bs != BLOCK_SIZE:
            raise SourceError(f"{self.describe()}: block size {bs}, expected {BLOCK_SIZE}")
        if blocks is not None:
            todo, incremental = sorted(set(blocks)), True
        else:
            incremental = self.incremental and info.get("base") is not None
            # block granularity: from the BATs alone (metadata only), the blocks /blocks sends
            query = "context=changed" if incremental else "context=allocation&granularity=block"
            runs = self._get_json(f"{self.path}/extents?{query}")
            found: set[int] = set()
            for r in runs:
                want = r.get("changed") if incremental else not (r.get("zero") or r.get("hole"))
                if want and r["length"] > 0:
                    first = r["start"] // bs
                    last = (r["start"] + r["length"] - 1) // bs
                    found.update(range(first, last + 1))
            todo = sorted(found)
        self.changed_stream = incremental and blocks is None
        self.plan = DiskPlan(size, bs, todo, incremental, self.name)
        return self.plan

    def _workers(self, blocks):
        return [self._stream_worker(part) for part in split_ranges(blocks, self.streams)]

    def _stream_worker(self, blocks: list[int]):
        wanted = set(blocks)

        def run(emit):
            attempt = 0
            remaining = sorted(wanted)
            while remaining:
                first, last = remaining[0], remaining[-1]
                got: set[int] = set()
                try:
                    self._stream(first, last - first + 1, wanted, got, emit)
                except Stopped:
                    raise
                except (
                    OSError,
                    http.client.HTTPException,
                    hp.BlocksFormatError,
                    SourceError,
                ) as exc:
                    attempt += 1
                    if attempt > self.retries:
                        raise SourceError(
                            f"{self.describe()}: blocks {first}-{last}: {exc} "
                            f"(gave up after {self.retries} retries)"
                        ) from exc
                    self.retries_count = getattr(self, "retries_count", 0) + 1
                    time.sleep(self.backoff * (2 ** (attempt - 1)))
                wanted.difference_update(got)
                remaining = sorted(wanted)

        return run

    def _stream(self, first: int, count: int, wanted: set[int], got: set[int], emit) -> None:
        changed = "1" if self.changed_stream else "0"
        path = f"{self.path}/blocks?changed={changed}&start={first}&count={count}"
        conn, resp = httpclient.get(
            self.base_url, path, fingerprint=self.fingerprint, timeout=self.io_timeout
        )
        try:
            dec = hp.BlocksDecoder()
            while True:
                data = resp.read(READ_SIZE)
                if not data:
                    break
                for ev in dec.feed(data):
                    if ev[0] == "block":
                        _, index, flags, payload = ev
                        if index in wanted and index not in got:
                            if flags & 1:  # ZERO frame
                                payload = bytes(self.plan.block_length(index))
                            emit(index, payload)
                            got.add(index)
            dec.finish()
        finally:
            conn.close()
        # A complete stream (end frame checked) did not carry these: they read as zeros.
        for index in sorted(wanted):
            if first <= index < first + count and index not in got:
                emit(index, bytes(self.plan.block_length(index)))
                got.add(index)
