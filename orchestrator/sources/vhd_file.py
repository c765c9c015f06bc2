"""A local VHD file (or chain) as a source: ``fastpath backup vdi --source FILE.vhd``."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from agent.vhd import VhdError, open_chain
from orchestrator.sources.base import DiskPlan, Source, SourceError, split_round_robin


class VhdFileSource(Source):
    name = "file"

    def __init__(self, path: str, *, threads: int = 2, max_in_flight: int = 8):
        super().__init__(max_in_flight=max_in_flight)
        self.path = path
        self.threads = threads
        self.chain = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"VHD file {self.path}"

    @property
    def uuid(self) -> str | None:
        u = getattr(self.chain, "uuid", None)
        return str(u) if u else None

    def open(self, blocks: Sequence[int] | None = None) -> DiskPlan:
        try:
            self.chain = open_chain(self.path)
        except (OSError, VhdError) as exc:
            raise SourceError(f"{self.path}: {exc}") from exc
        c = self.chain
        todo = sorted(set(blocks)) if blocks is not None else list(c.allocated_blocks())
        self.plan = DiskPlan(c.size, c.block_size, todo, blocks is not None, self.name)
        return self.plan

    def _workers(self, blocks):
        def worker(part):
            def run(emit):
                for i in part:
                    with self._lock:  # Chain is not documented thread-safe
                        data = self.chain.read_block(i)
                    emit(i, data[: self.plan.block_length(i)])

            return run

        return [worker(p) for p in split_round_robin(blocks, self.threads)]

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()
            self.chain = None
