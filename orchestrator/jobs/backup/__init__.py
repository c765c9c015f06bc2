"""``fastpath backup vm`` and ``fastpath backup vdi``: a VM's disks (or one disk) into a repository.

backup vm (README "Architecture in one screen")::

    1. find the VM, the previous restore point of it in the repository (its JSON names the
       snapshot each disk was read from: the base of this backup), remove snapshots an earlier
       interrupted run left behind ("[fastpath] …" snapshots that are not the base)
    2. enable CBT on the VM's disks when --cbt is given; VM.snapshot
    3. per disk, choose how to find what changed since the base:
         no restore point / base index or base snapshot gone / size changed  -> full
         base snapshot data-destroyed (cbt_metadata)  -> CBT (VDI.list_changed_blocks)
         agent (nbd, http): a ticket whose base is the base snapshot's parent VHD (XCP-ng
           snapshots are empty leaves over a hidden base; the new snapshot's chain contains
           that base, also after SM's GC coalesced it), the agent serves fastpath:changed
         xapi-export: export_raw_vdi?base=<base snapshot>;  xapi-nbd: CBT, else full
       a base that turns out unusable (the agent refuses it, CBT fails) falls back to full,
       and the job says so
    4. open every disk's source on the host that can read its SR (routing.py; --transport; auto:
       nbd, http, xapi-nbd, xapi-export, saying which host and transport were used and why),
       pull all disks in parallel through the pipeline
    5. commit each disk's index, then the restore point's JSON (VM metadata, snapshots, stats)
    6. rotate: keep the new snapshot as the next base, destroy the previous one; with
       --cbt-purge, VDI.data_destroy the new snapshot's disks (only CBT metadata stays)

A failure or Ctrl-C at any point before 5 destroys the new snapshot and commits nothing (the
session's pending indexes are removed and its lease released), so the repository and the pool
are as before.

Where it lives (orchestrator/jobs/backup/):

    cli.py         the two commands: arguments, runners, text rendering
    options.py     Tuning and VmBackupOptions: what a backup is asked to do, as plain values
    vm.py          backup_vm(session, target, repo, vm_uuid, options, ui=...): steps 1-6
    context.py     the XAPI side: session, plugin hosts, tickets, Disk, VM/VDI lookup, snapshots
    routing.py     which host reads each disk (local SR: its host; shared: resident or least loaded)
    transports.py  opening each disk's source (one transport, or auto with fallback), closing
    vdi.py         backup_vdi: one disk from an agent URL or a VHD file, no XAPI
    ../vmrecord.py what of the VM record a restore point keeps (shared with restore --new-vm)
"""

import importlib

from orchestrator.jobs.backup.cli import register, run_backup_vdi, run_backup_vm
from orchestrator.jobs.backup.options import Tuning, VmBackupOptions

# Loaded on first use (PEP 562): the CLI imports this package to register its commands, and the
# pipeline behind backup_vm/backup_vdi (the writer, the codec) is not needed for that.
_LAZY = {
    "SNAPSHOT_PREFIX": "context",
    "destroy_snapshot": "context",
    "snapshot_tag": "context",
    "backup_vdi": "vdi",
    "vdi_source": "vdi",
    "Phases": "vm",
    "backup_vm": "vm",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "SNAPSHOT_PREFIX",
    "Phases",
    "Tuning",
    "VmBackupOptions",
    "backup_vdi",
    "backup_vm",
    "destroy_snapshot",
    "register",
    "run_backup_vdi",
    "run_backup_vm",
    "snapshot_tag",
    "vdi_source",
]
