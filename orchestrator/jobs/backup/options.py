"""What a backup is asked to do, as plain values: ``Tuning`` (connections, depths, threads,
retries of the data path) and ``VmBackupOptions`` (transport, CBT, full); ``fastpath backup``
builds them from its arguments (orchestrator/jobs/backup/cli.py), a job runner from its job file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.cliutil import UsageError
from orchestrator.sources import TRANSPORTS


@dataclass(frozen=True)
class Tuning:
    connections: int = 4  # connections/streams per disk
    depth: int = 8  # NBD requests in flight per connection
    store_threads: int = 8  # chunk store threads per disk
    parallel_disks: int = 4  # disks of a VM read at once
    read_ahead: int = 16  # blocks read ahead of the store, per disk
    retries: int = 3  # reconnects per connection
    io_timeout: float = 60.0  # seconds without an answer = failure


@dataclass(frozen=True)
class VmBackupOptions:
    transport: str = "auto"  # one of orchestrator.sources.TRANSPORTS, or "auto"
    cbt: bool = False  # enable CBT on the VM's disks and use it
    cbt_purge: bool = False  # keep only CBT metadata of the snapshot (VDI.data_destroy)
    full: bool = False  # ignore earlier restore points
    tuning: Tuning = field(default_factory=Tuning)

    def check(self) -> None:
        """UsageError for a combination that cannot work."""
        if self.transport != "auto" and self.transport not in TRANSPORTS:
            raise UsageError(f"unknown transport {self.transport!r}")
        if self.cbt_purge and self.transport == "xapi-export":
            raise UsageError("--cbt-purge needs CBT; xapi-export cannot use it")
