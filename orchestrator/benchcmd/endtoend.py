"""Question 2 of ``fastpath bench``, end to end: ``fastpath backup vm`` into a repository.

Per sequence (``end_to_end_plan``): a fresh repository, a full backup, then after guest writes of
~1 % and ~10 % of the disk (hostsim's ``hostsim.write``), incrementals; for each transport
(``TRANSPORT_KIND``) on a local repository, and for the agent's NBD on the repository variants
(encrypted, uncompressed, S3 on a moto server, S3 encrypted). Compared with the physical limit of
the same run (``limit_cmd``, run by orchestrator/benchcmd/physical.py): the disk's VHD files
copied with fdatasync onto the repository's filesystem (local), or uploaded as plain objects (S3).
"""

from __future__ import annotations

import json
import os
from typing import Any

from orchestrator.benchcmd import report
from orchestrator.benchcmd.harness import PASSPHRASE, Bench, Options
from orchestrator.benchcmd.measure import PY, child_env, run_measured

TRANSPORT_KIND = {
    "nbd": "fast path",
    "http": "fast path",
    "xapi-nbd": "xapi",
    "xapi-export": "xapi",
}


def guest_write(b: Bench, disk: dict[str, Any], fraction: float, seed: int) -> int:
    """Guest writes of ~fraction of the disk in 1 MiB pieces; returns the bytes written."""
    x = b.xapi_session.xenapi
    vm = x.VM.get_by_uuid(disk["vm"])
    piece = 1 << 20
    count = max(1, round(disk["size"] * fraction / piece))
    spec = {"pattern": "mixed", "count": str(count), "length": str(piece), "seed": str(seed)}
    out = b.xapi_session.xenapi_request("hostsim.write", (vm, spec))
    return sum(int(n) for writes in out.values() for _, n in writes)


def hostsim_gc(b: Bench) -> None:
    """Let SM's GC coalesce what destroyed snapshots left, so every sequence starts alike."""
    for _ in range(20):
        if not b.xapi_session.xenapi_request("hostsim.gc", ()):
            return


def backup_cmd(b: Bench, disk: dict[str, Any], repo: str, transport: str) -> list[str]:
    cmd = [PY, "-m", "orchestrator.cli", "backup", "vm", disk["vm"], "--hostsim", b.hostsim_root]
    cmd += ["--repo", repo, "--transport", transport, "--connections", str(b.opts.connections)]
    cmd += ["--json", "--progress", "quiet"]
    if transport == "xapi-nbd":
        cmd.append("--cbt")
    return cmd


def limit_cmd(b: Bench, disk: dict[str, Any], variant: str) -> list[str]:
    if variant.startswith("s3"):
        spec = {
            "kind": "s3-put",
            "endpoint": b.s3_endpoint if b.moto is not None else None,
            "bucket": b.s3_bucket,
            "prefix": f"{b.s3_prefix}limit-{disk['name']}",
            "files": disk["files"],
        }
        return [PY, "-m", "orchestrator.benchcmd.physical", json.dumps(spec)]
    dest_dir = b.local_base()
    os.makedirs(dest_dir, exist_ok=True)
    spec = {"kind": "copy", "dest": os.path.join(dest_dir, f"limit-{disk['name']}.vhd")}
    spec["files"] = disk["files"]
    return [PY, "-m", "orchestrator.benchcmd.physical", json.dumps(spec)]


def end_to_end_plan(opts: Options, disks: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(disk, transport, repo variant) sequences: every transport on a local repository for
    every disk; the agent's NBD on every repository variant for the last disk."""
    names = [d for d in opts.e2e_disks if d in disks]
    plan = [(d, t, "local") for d in names for t in opts.transports]
    if not names:
        return plan
    last = names[-1]
    for v in opts.variants:
        if v.startswith("s3") and not opts.s3:
            continue
        plan.append((last, "nbd", v))
    return plan


def end_to_end(b: Bench, disks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    samples: dict[tuple, list] = {}
    meta: dict[tuple, dict] = {}
    plan = end_to_end_plan(b.opts, disks)
    # the bench's repositories are its own: pinned in its own state dir (never the user's), and
    # only the encrypted variants get a passphrase (one for a plain repository is an error)
    plain_env = child_env({**b.env, "FASTPATH_STATE_DIR": os.path.join(b.work, "state")})
    env = plain_env
    servers = [b.hostsim_pid, b.agent_pid]
    fractions = {"inc1": 0.01, "inc10": 0.10}
    for run in range(b.opts.runs):
        limits = {(d, "s3" if v.startswith("s3") else "local") for d, _, v in plan}
        for name, where in sorted(limits):
            b.opts.say(f"end to end run {run + 1}/{b.opts.runs}: {name} physical limit ({where})")
            disk = disks[name]
            sample, out = run_measured(limit_cmd(b, disk, where), [], env=env)
            sample["data_seconds"] = json.loads(out.strip().splitlines()[-1])["seconds"]
            samples.setdefault((name, "limit", where, "full"), []).append(sample)
        for name, transport, variant in plan:
            disk = disks[name]
            hostsim_gc(b)
            repo = b.new_repo(variant)
            env = (
                {**plain_env, "FASTPATH_PASSPHRASE": PASSPHRASE}
                if "encrypted" in variant
                else plain_env
            )
            try:
                steps = b.opts.steps
                if variant != "local" and b.opts.variant_steps is not None:
                    steps = tuple(x for x in steps if x in b.opts.variant_steps)
                for k, step in enumerate(steps):
                    written = 0
                    if step in fractions:
                        written = guest_write(b, disk, fractions[step], seed=run * 100 + k)
                    b.opts.say(
                        f"end to end run {run + 1}/{b.opts.runs}: {name} {transport} "
                        f"{variant} {step}"
                    )
                    sample, out = run_measured(backup_cmd(b, disk, repo, transport), servers, env)
                    doc = json.loads(out.strip().splitlines()[-1])
                    want_inc = step != "full"
                    got_inc = all(d.get("incremental") for d in doc.get("disks", []))
                    if want_inc != got_inc:
                        raise RuntimeError(
                            f"{name} {transport} {variant} {step}: the backup was "
                            f"{'incremental' if got_inc else 'full'}: {doc}"
                        )
                    # the data phase: reading and storing the disks (the backup's own figure)
                    sample["data_seconds"] = max(d["seconds"] for d in doc["disks"])
                    sample["bytes_read"] = doc.get("bytes_read")
                    sample["bytes_written"] = doc.get("bytes_written")
                    sample["guest_bytes_written"] = written
                    key = (name, transport, variant, step)
                    samples.setdefault(key, []).append(sample)
                    meta[key] = {"restore_point": doc.get("id")}
            finally:
                b.drop_repo(repo)
    rows = []
    for key, ss in samples.items():
        name, transport, variant, step = key
        nbytes = disks[name]["allocated_bytes"]
        if transport == "limit":
            label = "physical limit: " + (
                "plain S3 objects (boto3)" if variant == "s3" else "copy + fdatasync"
            )
            rows.append(
                report.make_row(
                    f"e2e/{name}/limit/{variant}",
                    "end_to_end",
                    label,
                    name,
                    nbytes,
                    ss,
                    kind="limit",
                    transport="limit",
                    repo=variant,
                    step="",
                )
            )
            continue
        where = "s3" if variant.startswith("s3") else "local"
        xapi_id = f"e2e/{name}/xapi-export/local/{step}"
        rows.append(
            report.make_row(
                f"e2e/{name}/{transport}/{variant}/{step}",
                "end_to_end",
                f"backup --transport {transport}",
                name,
                nbytes,
                ss,
                kind=TRANSPORT_KIND[transport],
                transport=transport,
                repo=variant,
                step=step,
                changed_pct=100.0
                * statistics_median([s["guest_bytes_written"] for s in ss])
                / disks[name]["size"],
                bytes_stored=statistics_median([s["bytes_written"] or 0 for s in ss]),
                baseline_xapi=xapi_id,
                baseline_limit=f"e2e/{name}/limit/{where}",
            )
        )
    report.set_ratios(rows)
    repos = ["local", "encrypted", "uncompressed", "s3", "s3-encrypted"]
    steps = ["", "full", "inc1", "inc10"]
    transports = ["limit", *TRANSPORT_KIND]
    rows.sort(
        key=lambda r: (
            list(disks).index(r["disk"]),
            repos.index(r["repo"]) if r["repo"] in repos else 9,
            steps.index(r["step"]),
            transports.index(r["transport"]),
        )
    )
    return rows


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)
