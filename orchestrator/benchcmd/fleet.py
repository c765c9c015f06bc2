"""Dedup and storage report on a fleet built from one template (also `fastpath bench --fleet`).

A simulated pool (hostsim's Pool and guest data generators, in this process, no servers): one
template disk filled like an installed OS (``guest.fill_template``: text, binary records, code-like
bytes, zero runs, some incompressible data, holes), --vms VMs fast-cloned from it, each with its own
first writes (8 x 256 KiB "mixed") and a few files copied from the previous VM. Then --days days:
every VM writes ~1 % of its disk a day ("mixed": text, binaries, random, zeros, in 64 KiB pieces),
and once a week the whole fleet gets the same "update" (identical bytes at identical offsets in
every VM, like a package upgrade), and every VM is backed up into one repository through the real
writer (``Repository.begin_backup`` / ``DiskWriter``): day 0 full, then incremental (the previous
index as base, only the blocks the guest wrote are put again).

Reported, from the repository and from the data itself:
- logical bytes (sum over restore points of each disk's non-zero 2 MiB chunks) vs stored bytes
  (the chunk objects' sizes as listed by the backend);
- dedup ratio (logical / unique plaintext), compression ratio (unique plaintext / stored payload);
- RAM of the dedup lookup (``DigestLookup.nbytes``, 8 bytes per unique chunk) per TB of unique
  data, and the synthetic 1 TiB figure of ``lookup_ram_per_tb`` (bench/prune_scale.py prints it
  too);
- the same data's duplication ratio at ZFS-like 128 KiB records (logical non-zero records /
  unique records, BLAKE3 of every 128 KiB of every restore point), next to ours at 2 MiB.

    fastpath bench --fleet [--quick] [--vms N --days N --size SIZE] [--out DIR] [--json]
    .venv/bin/python -m orchestrator.benchcmd.fleet       # 10 VMs x 30 days, 64 MiB disks
    .venv/bin/python -m orchestrator.benchcmd.fleet --quick   # 3 VMs x 3 days, 8 MiB disks
    .venv/bin/python -m bench.fleet --vms 20 --days 60 --size 256M --json   # the same, from bench/
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from typing import Any

BLOCK = 2 << 20
RECORD = 128 << 10
PAGE = 4096


def _digest(data) -> bytes:
    import blake3

    return blake3.blake3(data).digest()


class RecordCensus:
    """Duplication of the logical data at a fixed record size (ZFS-like), zero records skipped."""

    def __init__(self, record: int):
        self.record = record
        self.logical = 0
        self.unique: set[bytes] = set()
        self.zero = bytes(record)

    def block_records(self, data: bytes) -> list[bytes]:
        out = []
        for off in range(0, len(data), self.record):
            piece = data[off : off + self.record]
            if piece.count(0) != len(piece):
                out.append(_digest(piece))
        return out

    def add(self, records: list[bytes]) -> None:
        self.logical += len(records)
        self.unique.update(records)

    def ratio(self) -> float:
        return self.logical / max(1, len(self.unique))


def build_fleet(pool, vms: int, size: int, seed: int):
    from hostsim import guest

    api, st = pool.api, pool.api.store
    tpl = pool.create_vm("fleet-template", [size], template=True)
    guest.fill_template(pool, pool.vm_vdis(tpl)[0], seed=seed)
    out = []
    prev = None
    for i in range(vms):
        vm = api.vm__clone(tpl, "fleet-vm%02d" % (i + 1))
        st.update("VM", vm, is_a_template=False)
        vdi = pool.vm_vdis(vm)[0]
        guest.guest_write(pool, vdi, "mixed", count=8, length=256 << 10, seed=seed * 1000 + i + 1)
        if prev is not None:
            guest.guest_write(
                pool, vdi, "copy", count=2, length=128 << 10, seed=seed * 1000 + 77, source_vdi=prev
            )
        prev = vdi
        out.append((st.field("VM", vm, "uuid"), vdi, st.field("VDI", vdi, "uuid")))
    return out


def fleet_update(pool, fleet, size: int, seed: int) -> set[int]:
    """The same bytes at the same offsets in every VM (a package upgrade across the fleet)."""
    from hostsim import guest

    rng = random.Random(seed)
    writes = guest.plan(size, max(1, size // (64 << 20)) * 4, 128 << 10, seed)
    payload = [guest.data_for("binary", rng, n) for _, n in writes]
    for _vm, vdi, _uuid in fleet:
        for (off, _n), data in zip(writes, payload, strict=True):
            pool.guest_write(vdi, off, data)
        pool.api.refresh_vdi(vdi)
    return {b for off, n in writes for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)}


def backup(repo, pool, vm_uuid, vdi_uuid, size, blocks, base_key, censuses, state):
    """One restore point: put ``blocks`` (all allocated ones for a full) onto the base index.
    ``state`` (block -> (2 MiB chunk digest or None, 128 KiB record digests)) follows the disk,
    and every restore point adds the whole disk's view to both censuses."""
    chunks, records = censuses
    session = repo.begin_backup(vm_uuid)
    try:
        w = session.disk_writer(vdi_uuid, vdi_uuid, size, base=base_key, concurrency=2)
        for b in blocks:
            n = min(BLOCK, size - b * BLOCK)
            data = pool.sr.read(vdi_uuid, b * BLOCK, n)
            w.put_chunk(b, data)
            zero = data.count(0) == len(data)
            state[b] = (None if zero else _digest(data), records.block_records(data))
        key = w.commit()
        session.commit({"fleet": True})
    except BaseException:
        session.abort()
        raise
    for chunk, recs in state.values():
        records.add(recs)
        chunks.add([chunk] if chunk else [])
    return key, w.stats


def run_fleet(
    vms: int = 10,
    days: int = 30,
    size: str = "64M",
    out: str | None = None,
    repo_dir: str | None = None,
    seed: int = 0,
    log=None,
) -> dict[str, Any]:
    from hostsim import guest
    from hostsim.cli import parse_size
    from hostsim.host import Pool
    from orchestrator.repo.repository import Repository
    from orchestrator.repo.writer import WriterStats

    say = log or (lambda line: None)
    nbytes = parse_size(size) if isinstance(size, str) else int(size)
    nbytes -= nbytes % BLOCK
    if nbytes <= 0 or vms < 1 or days < 0:
        raise RuntimeError("fleet: --size must be >= 2M, --vms >= 1, --days >= 0")
    work = tempfile.mkdtemp(prefix="fastpath-fleet-")
    t0 = time.time()
    pool = None
    repo = None
    try:
        pool = Pool(os.path.join(work, "pool"), gc_interval=0)
        say(f"building {vms} VMs of {nbytes >> 20} MiB from one template")
        fleet = build_fleet(pool, vms, nbytes, seed)
        repo_url = repo_dir or os.path.join(work, "repo")
        repo = Repository.init(repo_url)
        census = RecordCensus(RECORD)
        chunks = RecordCensus(BLOCK)
        stats = WriterStats()
        bases: dict[str, str] = {}
        states: dict[str, dict[int, tuple]] = {}
        points = 0
        daily = max(1, nbytes // 100 // (64 << 10))
        for day in range(days + 1):
            updated: set[int] = set()
            if day and day % 7 == 0:
                updated = fleet_update(pool, fleet, nbytes, seed * 7919 + day)
            for k, (vm_uuid, vdi_ref, vdi_uuid) in enumerate(fleet):
                if day == 0:
                    changed = set(pool.sr.allocated_blocks(vdi_uuid))
                    states[vdi_uuid] = {}
                else:
                    writes = guest.guest_write(
                        pool, vdi_ref, "mixed", count=daily, length=64 << 10, seed=day * 1000 + k
                    )
                    changed = set()
                    for off, n in writes:
                        changed.update(range(off // BLOCK, (off + n - 1) // BLOCK + 1))
                    changed |= updated
                blocks = sorted(changed)
                key, st = backup(
                    repo,
                    pool,
                    vm_uuid,
                    vdi_uuid,
                    nbytes,
                    blocks,
                    bases.get(vdi_uuid),
                    (chunks, census),
                    states[vdi_uuid],
                )
                bases[vdi_uuid] = key
                stats.add(st)
                points += 1
                time.sleep(0.001)  # distinct restore-point times (1 ms resolution is enough)
            if day % 5 == 0 or day == days:
                say(f"day {day}/{days}: {points} restore points")
        stored = sum(o.size for o in repo.backend.list("chunks/"))
        index_bytes = sum(o.size for o in repo.backend.list("backups/"))
        lookup = repo.dedup_lookup()
        unique_chunks = len(lookup)
        logical = chunks.logical * BLOCK
        unique_plain = unique_chunks * BLOCK
        result = {
            "ok": True,
            "fleet": True,
            "vms": vms,
            "days": days,
            "disk_size": nbytes,
            "restore_points": points,
            "data": (
                "one template (hostsim.guest.fill_template: 60 % of the disk in 64-256 KiB pieces "
                "of text, binary records, code-like bytes, random bytes, zero runs, with holes), "
                "VMs fast-cloned from it with their own first writes and files copied between "
                "them; daily ~1 % 'mixed' guest writes per VM in 64 KiB pieces; weekly the same "
                "update written in every VM"
            ),
            "logical_bytes": logical,
            "unique_chunks": unique_chunks,
            "stored_bytes": stored,
            "index_and_metadata_bytes": index_bytes,
            "dedup_ratio": logical / max(1, unique_plain),
            "compression_ratio": stats.new_plain_bytes / max(1, stats.compressed_bytes),
            "total_reduction": logical / max(1, stored),
            "writer": stats.to_json(),
            "lookup_bytes": lookup.nbytes,
            "lookup_mb_per_tb": lookup.nbytes / max(1, unique_plain) * 1e12 / 1e6,
            "dedup_ratio_2mib_from_data": chunks.ratio(),
            "dedup_ratio_128k_records": census.ratio(),
            "records_128k": {"logical": census.logical, "unique": len(census.unique)},
            "seconds": time.time() - t0,
        }
        result["lookup_synthetic_1tib"] = lookup_ram_per_tb()
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "fleet.json"), "w") as f:
                json.dump(result, f, indent=1, sort_keys=True)
            with open(os.path.join(out, "fleet.md"), "w") as f:
                f.write(render(result) + "\n")
        return result
    finally:
        if repo is not None:
            repo.close()
        if pool is not None:
            pool.stop()
        shutil.rmtree(work, ignore_errors=True)


def lookup_ram_per_tb() -> dict[str, float]:
    """The dedup lookup's RAM for 1 TiB of unique data: 524288 random digests (2 MiB chunks)."""
    from orchestrator.repo.codec import CHUNK_SIZE
    from orchestrator.repo.dedup import DigestLookup

    chunks_tib = 524288
    entries = os.urandom(32 * chunks_tib)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    lookup = DigestLookup()
    lookup.add_many([("k", entries)])
    retained = tracemalloc.get_traced_memory()[0] - before
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    per_tb = 10**12 / (chunks_tib * CHUNK_SIZE)
    return {
        "array_mb_per_tb": lookup.nbytes * per_tb / 1e6,
        "retained_mb_per_tb": retained * per_tb / 1e6,
        "build_peak_mb_per_tb": peak * per_tb / 1e6,
    }


def render(r: dict[str, Any]) -> str:
    gb = 1e9
    syn = r.get("lookup_synthetic_1tib") or {}
    lines = [
        f"Fleet: {r['vms']} VMs x {r['days']} days ({r['restore_points']} restore points), "
        f"{r['disk_size'] >> 20} MiB disks. Data: {r['data']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| logical bytes (non-zero 2 MiB chunks of every restore point) | "
        f"{r['logical_bytes'] / gb:.3f} GB |",
        f"| stored bytes (chunk objects) | {r['stored_bytes'] / gb:.3f} GB |",
        f"| indexes + restore-point JSON | {r['index_and_metadata_bytes'] / 1e6:.2f} MB |",
        f"| dedup ratio (logical / unique) | {r['dedup_ratio']:.2f}x |",
        f"| compression ratio (zstd-1, new chunks) | {r['compression_ratio']:.2f}x |",
        f"| total reduction (logical / stored) | {r['total_reduction']:.2f}x |",
        f"| dedup lookup RAM | {r['lookup_bytes']} B = {r['lookup_mb_per_tb']:.2f} MB per TB "
        "of unique data |",
    ]
    if syn:
        lines.append(
            f"| dedup lookup RAM, synthetic 1 TiB (bench.prune_scale) | "
            f"{syn['array_mb_per_tb']:.2f} MB/TB retained, "
            f"{syn['build_peak_mb_per_tb']:.1f} MB/TB peak while building |"
        )
    lines += [
        f"| same data at 2 MiB chunks (from the data) | {r['dedup_ratio_2mib_from_data']:.2f}x |",
        f"| same data at ZFS-like 128 KiB records | {r['dedup_ratio_128k_records']:.2f}x |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--quick", action="store_true", help="3 VMs x 3 days, 8 MiB disks")
    ap.add_argument("--out", help="write fleet.md and fleet.json here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.vms, args.days, args.size = 3, 3, "8M"
    r = run_fleet(
        args.vms,
        args.days,
        args.size,
        out=args.out,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(r, sort_keys=True) if args.json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
