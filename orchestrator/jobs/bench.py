"""``fastpath bench``: the speed comparison (orchestrator.benchcmd.run) and ``--fleet``, the dedup
and storage report (orchestrator.benchcmd.fleet). The work lives in orchestrator/benchcmd (its map
is run.py's docstring); this module only registers the command and turns its options into
``harness.Options``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from orchestrator.cliutil import CommandFailed, UsageError
from orchestrator.progress import Progress

QUICK = {
    "size": "256M",
    "runs": 2,
    "transports": ("nbd", "xapi-export"),
    "variants": ("encrypted", "s3"),
    "e2e_disks": ("chain3",),
    "steps": ("full", "inc1"),
    "variant_steps": ("full",),
}


def register(registry) -> None:
    p = registry.add(
        "bench", run_bench, help="speed comparison: fast path vs XAPI's way vs the physical limit"
    )
    p.add_argument(
        "--quick", action="store_true", help="256 MiB disks, 2 runs, fewer rows (about a minute)"
    )
    p.add_argument("--size", help="virtual size of each test disk (default 1G; --quick 256M)")
    p.add_argument("--runs", type=int, help="runs per measurement (default 3; --quick 2)")
    p.add_argument("--connections", type=int, default=4, help="connections/streams (default 4)")
    p.add_argument("--xapi", metavar="URL", help="measure a real pool instead of hostsim")
    p.add_argument("--vm", metavar="UUID", help="with --xapi: the VM to read (snapshot only)")
    p.add_argument("--user", default="root", help="with --xapi: XAPI user")
    p.add_argument("--password", help="with --xapi: XAPI password ($FASTPATH_XAPI_PASSWORD)")
    p.add_argument(
        "--xapi-cafile", metavar="PEM", help="with --xapi: CA (or the pool's certificate) for https"
    )
    p.add_argument(
        "--repo",
        metavar="REPO",
        help="where the end-to-end repositories go: a directory (local rows; default a temporary "
        "one) or s3://bucket/prefix (S3 rows on that provider instead of a local moto server)",
    )
    p.add_argument(
        "--out",
        default="bench-out",
        metavar="DIR",
        help="write bench.md, bench.json (and bench.png) here (default ./bench-out; printed at the end)",
    )
    p.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) repositories")
    p.add_argument(
        "--data",
        choices=("guest", "usr"),
        help="disk content: guest = hostsim's generators (text, binaries, zeros, random; "
        "--quick default), usr = ext4 of real /usr files via mkfs.ext4 -d (default)",
    )
    p.add_argument(
        "--transports", help="comma list for end to end (default nbd,http,xapi-nbd,xapi-export)"
    )
    p.add_argument(
        "--variants",
        help="comma list of repository variants for the agent's NBD "
        "(default encrypted,uncompressed,s3,s3-encrypted)",
    )
    p.add_argument("--steps", help="comma list of full,inc1,inc10 (default all)")
    p.add_argument("--fleet", action="store_true", help="the dedup and storage report instead")
    p.add_argument("--vms", type=int, help="--fleet: VMs from one template (default 10)")
    p.add_argument("--days", type=int, help="--fleet: daily incrementals (default 30)")
    p.set_defaults(_render=_render)


def _progress_log():
    """Progress lines on stderr, each with the seconds since the bench started (where a run's
    time goes: building disks, servers, each measurement)."""
    import time

    t0 = time.monotonic()

    def log(line: str) -> None:
        print(f"bench: [{time.monotonic() - t0:6.1f} s] {line}", file=sys.stderr, flush=True)

    return log


def _csv(text: str | None, default: tuple[str, ...], allowed: tuple[str, ...], what: str):
    if not text:
        return default
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in allowed]
    if bad:
        raise UsageError(f"unknown {what}: {', '.join(bad)} (one of {', '.join(allowed)})")
    return items


def run_bench(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    if args.fleet:
        return _run_fleet(args, ui)
    from orchestrator.benchcmd import run
    from orchestrator.benchcmd.harness import Options
    from orchestrator.benchcmd.realpool import run_real_pool

    if (args.xapi is None) != (args.vm is None):
        raise UsageError("--xapi URL and --vm UUID go together")
    if args.runs is not None and args.runs < 1:
        raise UsageError("--runs must be >= 1")
    quick = QUICK if args.quick else {}
    opts = Options(
        quick=args.quick,
        size=args.size or quick.get("size", "1G"),
        runs=args.runs or quick.get("runs", 3),
        connections=args.connections,
        xapi=args.xapi,
        vm=args.vm,
        user=args.user,
        password=args.password,
        xapi_cafile=args.xapi_cafile,
        repo=args.repo,
        out=args.out,
        s3=not args.no_s3,
        data=args.data or ("guest" if args.quick else "usr"),
        log=_progress_log(),
    )
    opts.transports = _csv(
        args.transports,
        quick.get("transports", opts.transports),
        ("nbd", "http", "xapi-nbd", "xapi-export"),
        "transport",
    )
    opts.variants = _csv(
        args.variants,
        quick.get("variants", opts.variants),
        ("encrypted", "uncompressed", "s3", "s3-encrypted"),
        "variant",
    )
    opts.e2e_disks = quick.get("e2e_disks", opts.e2e_disks)
    opts.variant_steps = quick.get("variant_steps")
    opts.steps = _csv(args.steps, quick.get("steps", opts.steps), ("full", "inc1", "inc10"), "step")
    if opts.steps and "full" not in opts.steps:
        raise UsageError("--steps needs full: the first backup into a fresh repository is full")
    if args.progress == "quiet":
        opts.log = None
    try:
        if args.xapi:
            return run_real_pool(opts)
        return run.run_bench(opts)
    except RuntimeError as exc:
        raise CommandFailed(str(exc)) from None


def _run_fleet(args: argparse.Namespace, ui: Progress) -> dict[str, Any]:
    from orchestrator.benchcmd import fleet

    try:
        if (args.vms is not None and args.vms < 1) or (args.days is not None and args.days < 0):
            raise UsageError("--vms must be >= 1 and --days >= 0")
        if args.repo and args.repo.startswith("s3://"):
            raise UsageError("--fleet builds a local repository: --repo must be a directory")
        return fleet.run_fleet(
            vms=args.vms if args.vms is not None else (3 if args.quick else 10),
            days=args.days if args.days is not None else (3 if args.quick else 30),
            size=args.size or ("8M" if args.quick else "64M"),
            out=args.out,
            repo_dir=args.repo,
            log=None
            if args.progress == "quiet"
            else lambda line: print(f"bench --fleet: {line}", file=sys.stderr, flush=True),
        )
    except RuntimeError as exc:
        raise CommandFailed(str(exc)) from None


def _render(result: dict[str, Any]) -> str:
    if result.get("fleet"):
        from orchestrator.benchcmd.fleet import render

        return render(result)
    from orchestrator.benchcmd.output import render

    return render(result)
