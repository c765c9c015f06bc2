"""``fastpath bench``: the speed comparison of docs/benchmarks.md "How speed is
compared", in one run.

Two questions, answered in two tables, never mixed:

1. host side — a VDI's allocated data delivered by the exporting host to a client that discards
   it (the fast path's readers, XAPI's ways, qemu-nbd, and ``cat`` as the physical limit);
2. end to end — ``fastpath backup vm`` into a repository (full, then incrementals after guest
   writes of ~1 % and ~10 % of the disk), compared with the physical limit of the same run.

Where things live (orchestrator/benchcmd/):

- ``run.py`` (here): the hostsim run, ``run_bench``: checks the tools, starts the environment,
  asks both questions, assembles the result;
- ``measure.py``: one command run as its own process, its seconds, CPU and peak RSS;
- ``harness.py``: ``Options`` and ``Bench``, the servers and repositories a run owns;
- ``hostside.py``: question 1; ``endtoend.py``: question 2;
- ``realpool.py``: the same questions against a real pool (``--xapi URL --vm UUID``);
- ``report.py``: rows, ratios, tables, headline and chart; ``output.py``: bench.md/.png/.json;
- processes the bench runs: ``hostpool.py`` (the simulated host), ``drain.py`` (a discarding
  reader), ``physical.py`` (the physical limits); ``usrdisk.py`` (the ``--data usr`` disk);
- ``fleet.py``: ``fastpath bench --fleet``, the dedup and storage report.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from typing import Any

from orchestrator.benchcmd.endtoend import end_to_end
from orchestrator.benchcmd.harness import Bench, Options
from orchestrator.benchcmd.hostside import host_side
from orchestrator.benchcmd.measure import TIME
from orchestrator.benchcmd.output import finish
from orchestrator.benchcmd.realpool import run_real_pool


def data_description(disks: dict[str, Any], size: int, data: str = "guest") -> str:
    parts = []
    for name, d in disks.items():
        parts.append(
            f"{name}: {d['size'] >> 20} MiB virtual, {d['allocated_bytes'] >> 20} MiB allocated, "
            f"{d['depth']}-deep VHD chain"
        )
    if data == "usr":
        return (
            "hostsim disks holding an ext4 file system made with mkfs.ext4 -d from real /usr "
            "files (text, binaries, libraries; ~45 % of the disk, the rest zeros, never "
            "allocated; bench/backup.py's build_disk); chain3 adds two levels of ~10 % 'mixed' "
            "guest writes (text, binary, random, zeros); incrementals follow 'mixed' guest "
            "writes of 1 MiB pieces (~1 % / ~10 % of the disk). " + "; ".join(parts)
        )
    return (
        "hostsim disks built by hostsim.guest: an installed-OS-like fill of 60 % of each disk "
        "in 64-256 KiB pieces (30 % log-like text, 35 % binary records and code-like bytes, "
        "10 % incompressible random bytes, 10 % zero runs, 15 % holes); chain3 adds two levels "
        "of ~10 % 'mixed' guest writes; incrementals follow 'mixed' guest writes of 1 MiB "
        "pieces (~1 % / ~10 % of the disk). " + "; ".join(parts)
    )


def run_bench(opts: Options) -> dict[str, Any]:
    from hostsim.cli import parse_size

    if opts.xapi:
        return run_real_pool(opts)
    for tool in ("nbdcopy", "qemu-nbd", "curl", TIME):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed")
    starts_moto = (
        opts.s3
        and any(v.startswith("s3") for v in opts.variants)
        and not (opts.repo and opts.repo.startswith("s3://"))
    )
    if starts_moto and importlib.util.find_spec("moto") is None:
        raise RuntimeError(
            "the S3 rows need moto's server, which is not installed: "
            "pip install 'xcp-fastpath[bench]', or leave S3 out with --no-s3"
        )
    size = parse_size(opts.size)
    os.makedirs(opts.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fastpath-bench-")
    b = Bench(opts, work)
    t0 = time.time()
    try:
        opts.say(f"building disks ({opts.size} each) and starting hostsim + agent")
        b.start_hostsim(opts.size)
        disks = {k: dict(b.info["bench"][k], name=k) for k in opts.disks}
        if opts.s3 and any(v.startswith("s3") for v in opts.variants):
            if opts.repo and opts.repo.startswith("s3://"):
                b.use_s3_url(opts.repo)
            else:
                opts.say("starting the moto S3 server")
                b.start_moto()
        host_rows = host_side(b, disks)
        e2e_rows = end_to_end(b, disks) if opts.steps and opts.transports else []
    finally:
        b.close()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "ok": True,
        "target": "hostsim",
        "data": data_description(disks, size, opts.data),
        "disks": {
            k: {x: v[x] for x in ("size", "allocated_bytes", "depth")} for k, v in disks.items()
        },
        "params": {
            "size": size,
            "runs": opts.runs,
            "connections": opts.connections,
            "quick": opts.quick,
            "transports": list(opts.transports),
            "variants": list(
                opts.variants if opts.s3 else [v for v in opts.variants if "s3" not in v]
            ),
            "steps": list(opts.steps),
            "agent_tls": "off",
            "data": opts.data,
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "seconds": time.time() - t0,
        "questions": {
            "host_side": {
                "title": "1. Host side: export read by a discarding client",
                "baseline": "xapi-export",
                "limit": "cat",
                "rows": host_rows,
            },
            "end_to_end": {
                "title": "2. End to end: backup into a repository vs the physical limit",
                "baseline": "xapi-export (local repository, same step)",
                "limit": "copy + fdatasync (local) / plain S3 objects (s3)",
                "rows": e2e_rows,
            },
        },
    }
    return finish(result, opts)
