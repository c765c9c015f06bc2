"""``fastpath bench``: the speed comparison of DESIGN.md "How speed is compared", in one run.

Two questions, answered in two tables, never mixed:

1. host side — a VDI's allocated data delivered by the exporting host to a client that discards
   it, on the same disks in the same run: the agent's NBD (``nbdcopy`` to ``null:``, and the
   orchestrator's own libnbd reader), the agent's HTTP blocks stream (orchestrator reader, N
   streams) and VHD stream (``curl`` to /dev/null), XAPI's way (hostsim's ``export_raw_vdi``:
   chain decoded to raw then re-encoded VHD, one stream), xapi-nbd's way (hostsim's endpoint:
   no block status, one request at a time per connection), ``qemu-nbd -r -f vpc`` + ``nbdcopy``
   (flat VHD only: qemu cannot open differencing disks), and the physical limit ``cat`` of the
   disk's VHD files from the page cache to /dev/null.
2. end to end — ``fastpath backup vm`` into a repository (full, then after guest writes of ~1 %
   and ~10 % of the disk, incremental), for each transport on a local repository, and for the
   agent's NBD on the repository variants (encrypted, uncompressed, S3 on a moto server, S3
   encrypted); compared with the physical limit of the same run: the disk's VHD files copied with
   fdatasync onto the repository's filesystem (local), or uploaded as plain objects (S3).

Every measured thing runs as its own process (reaped with ``os.wait4``: its CPU seconds and peak
RSS are its own); the servers' CPU is read from ``/proc/<pid>/stat`` (utime+stime of the agent,
of hostsim — whose figures include the XAPI plugin it spawns — or of qemu-nbd) and their peak RSS
from ``VmHWM`` (the process's lifetime peak).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.benchcmd import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
STEP_TIMEOUT = 3600
TIME = "/usr/bin/time"
PASSPHRASE = "fastpath-bench"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

HOST_KINDS = {
    "agent-nbd-nbdcopy": ("agent NBD (nbdcopy)", "fast path"),
    "agent-nbd": ("agent NBD (orchestrator reader)", "fast path"),
    "agent-http-blocks": ("agent HTTP blocks stream", "fast path"),
    "agent-http-vhd": ("agent HTTP VHD stream (curl, 1 stream)", "fast path"),
    "xapi-export": ("XAPI's way: export_raw_vdi (1 stream)", "xapi"),
    "xapi-nbd": ("xapi-nbd's way (1 request in flight per connection)", "xapi"),
    "qemu-nbd": ("qemu-nbd -r -f vpc + nbdcopy", "plain nbd"),
    "cat": ("physical limit: cat from page cache", "limit"),
}
TRANSPORT_KIND = {
    "nbd": "fast path",
    "http": "fast path",
    "xapi-nbd": "xapi",
    "xapi-export": "xapi",
}


@dataclass
class Options:
    quick: bool = False
    size: str = "1G"
    runs: int = 3
    connections: int = 4
    xapi: str | None = None
    vm: str | None = None
    user: str = "root"
    password: str | None = None
    xapi_cafile: str | None = None
    repo: str | None = None
    out: str = "bench-out"
    s3: bool = True
    transports: tuple[str, ...] = ("nbd", "http", "xapi-nbd", "xapi-export")
    variants: tuple[str, ...] = ("encrypted", "uncompressed", "s3", "s3-encrypted")
    steps: tuple[str, ...] = ("full", "inc1", "inc10")
    disks: tuple[str, ...] = ("flat", "chain3")
    e2e_disks: tuple[str, ...] = ("flat", "chain3")
    variant_steps: tuple[str, ...] | None = None  # steps on the repository variants (None: steps)
    seed: int = 0
    data: str = "guest"  # guest: hostsim.guest generators; usr: ext4 of /usr files (mkfs.ext4 -d)
    log: Any = None  # callable(str) for progress lines

    def say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)


# -- processes and their costs ------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime+stime+cutime+cstime of a running process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK


def proc_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_measured(
    cmd: list[str],
    servers: list[int] = (),
    env: dict[str, str] | None = None,
    timeout: float = STEP_TIMEOUT,
) -> tuple[dict[str, Any], str]:
    """Run ``cmd``; returns (sample, its stdout). Fails with the command's stderr tail."""
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    rss_fd, rss_path = tempfile.mkstemp(prefix="fastpath-bench-rss-")
    os.close(rss_fd)
    # /usr/bin/time (small, C) forks the command and reports its peak RSS: a child forked
    # straight from this big Python process would inherit its RSS high-water mark across exec.
    wrapped = [TIME, "-f", "%M", "-o", rss_path, "--", *cmd]
    before = [proc_cpu(p) for p in servers]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        wrapped, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True
    )
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C: the child is in its own session, so stop it here
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.wait4(proc.pid, 0)
        with contextlib.suppress(OSError):
            os.unlink(rss_path)
        out.close()
        err.close()
        raise
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    server_cpu = sum(proc_cpu(p) - b for p, b in zip(servers, before, strict=True))
    out.seek(0)
    err.seek(0)
    stdout = out.read().decode(errors="replace")
    stderr = err.read().decode(errors="replace")
    out.close()
    err.close()
    try:
        with open(rss_path) as f:
            rss_kib = int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        rss_kib = usage.ru_maxrss
    finally:
        os.unlink(rss_path)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])}… exited with {proc.returncode}: {stderr.strip()[-800:]}"
        )
    sample = {
        "seconds": seconds,
        "client_cpu": usage.ru_utime + usage.ru_stime,
        "server_cpu": server_cpu if servers else None,
        "client_rss": rss_kib * 1024,
        "server_rss": max(proc_hwm(p) for p in servers) if servers else None,
    }
    return sample, stdout


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def wait_file(path: str, proc: subprocess.Popen, timeout: float, what: str, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = open(log, errors="replace").read()[-1500:] if os.path.exists(log) else ""
            raise RuntimeError(f"{what} did not start: {tail}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- the environment: hostsim, qemu-nbd, moto -------------------------------------------------


@dataclass
class Bench:
    opts: Options
    work: str
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    hostsim_pid: int = 0
    agent_pid: int = 0
    qemu: dict[str, tuple[subprocess.Popen, str]] = field(default_factory=dict)
    s3_endpoint: str | None = None
    s3_bucket: str = "bench"
    s3_prefix: str = ""  # "" or "prefix/" (from --repo s3://bucket/prefix)
    moto: Any = None
    xapi_session: Any = None
    _counter: int = 0

    # hostsim --------------------------------------------------------------------------------

    def start_hostsim(self, size: str) -> None:
        root = os.path.join(self.work, "hostsim")
        os.makedirs(root, exist_ok=True)
        log = os.path.join(self.work, "hostsim.log")
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [PY, "-m", "orchestrator.benchcmd.hostpool", "--root", root, "--size", size]
                + ["--seed", str(self.opts.seed), "--data", self.opts.data],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=child_env(),
                cwd=ROOT,
                start_new_session=True,
            )
        self.procs.append(proc)
        state = os.path.join(root, "hostsim.json")
        wait_file(state, proc, 600, "hostsim", log)
        with open(state) as f:
            self.info = json.load(f)
        self.hostsim_root = root
        self.hostsim_pid = proc.pid
        self.agent_pid = int(self.info["agent"]["pid"])
        import XenAPI

        self.xapi_session = XenAPI.Session(self.info["xapi"]["url"])
        self.xapi_session.xenapi.login_with_password("root", "hostsim", "2.21", "bench")

    def ticket(self, vdi: str) -> str:
        from agent.tickets import admin_call

        resp = admin_call(
            self.info["agent"]["admin_socket"], {"op": "create_ticket", "vdi": vdi, "ttl": 7200}
        )
        if not resp.get("ok"):
            raise RuntimeError(f"agent ticket for {vdi}: {resp}")
        return resp["export_name"]

    def start_qemu_nbd(self, disk: str, path: str) -> tuple[subprocess.Popen, str]:
        if disk in self.qemu:
            return self.qemu[disk]
        sock = os.path.join(self.work, f"qemu-{disk}.sock")
        proc = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "vpc", "-t", "--shared=16", "-k", sock, "-x", "disk", path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.05)
        self.qemu[disk] = (proc, f"nbd+unix:///disk?socket={sock}")
        return self.qemu[disk]

    def start_moto(self) -> None:
        """moto's S3 server (``moto[server]``) on a free loopback port, as our S3 stand-in."""
        import socket
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(os.path.join(self.work, "moto.log"), "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT")}
        self.moto = subprocess.Popen(
            [PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, **S3_ENV},
        )
        log.close()
        self.procs.append(self.moto)
        self.s3_endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.s3_endpoint + "/moto-api/data.json", timeout=5).read()
                break
            except OSError:
                if self.moto.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the moto S3 server did not start (is moto[server] installed?)"
                    ) from None
                time.sleep(0.2)
        self.env.update(S3_ENV)
        for k, v in S3_ENV.items():  # this process opens the S3 repositories too
            os.environ.setdefault(k, v)
        self.env.update(
            {"AWS_ENDPOINT_URL_S3": self.s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        )
        self.s3_client().create_bucket(Bucket="bench")

    def use_s3_url(self, url: str) -> None:
        """--repo s3://bucket/prefix: the S3 rows use that provider (AWS configuration chain)."""
        bucket, _, prefix = url[len("s3://") :].partition("/")
        self.s3_bucket = bucket
        self.s3_prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def s3_client(self):
        import boto3

        if self.moto is None:  # the user's provider: standard AWS configuration
            return boto3.client("s3")
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def local_base(self) -> str:
        repo = self.opts.repo
        if repo and not repo.startswith("s3://"):
            return repo
        return os.path.join(self.work, "repos")

    def close(self) -> None:
        if self.xapi_session is not None:
            try:
                self.xapi_session.xenapi.session.logout()
            except Exception:
                pass
        for proc in reversed(self.procs):
            stop(proc)

    # repositories ---------------------------------------------------------------------------

    def new_repo(self, variant: str) -> str:
        from orchestrator.repo.backends import open_backend
        from orchestrator.repo.config import init_repo

        self._counter += 1
        name = f"repo-{self._counter}-{variant}"
        if variant.startswith("s3"):
            url = f"s3://{self.s3_bucket}/{self.s3_prefix}{name}"
            options = {"endpoint_url": self.s3_endpoint, "region": "us-east-1"}
            backend = open_backend(url, **(options if self.moto is not None else {}))
        else:
            url = os.path.join(self.local_base(), name)
            backend = open_backend(url, create=True)
        try:
            init_repo(
                backend,
                encrypt="encrypted" in variant,
                passphrase=PASSPHRASE if "encrypted" in variant else None,
                compression="none" if variant == "uncompressed" else "zstd:1",
            )
        finally:
            backend.close()
        return url

    def drop_repo(self, url: str) -> None:
        if url.startswith("s3://"):
            prefix = url[len(f"s3://{self.s3_bucket}/") :] + "/"
            s3 = self.s3_client()
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.s3_bucket, Prefix=prefix
            )
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=self.s3_bucket, Delete={"Objects": keys})
        else:
            shutil.rmtree(url, ignore_errors=True)


# -- question 1: host side ----------------------------------------------------------------------


def host_side_cmd(b: Bench, kind: str, disk: dict[str, Any]) -> tuple[list[str], list[int]]:
    conns = b.opts.connections
    info = b.info
    if kind in ("agent-nbd-nbdcopy", "agent-nbd", "agent-http-blocks", "agent-http-vhd"):
        ticket = b.ticket(disk["vdi"])
        nbd_host, nbd_port = info["agent"]["nbd"][:2]
        http_host, http_port = info["agent"]["http"][:2]
        nbd_url = f"nbd://{nbd_host}:{nbd_port}/{ticket}"
        http_url = f"http://{http_host}:{http_port}/v1/exports/{ticket}"
        if kind == "agent-nbd-nbdcopy":
            return ["nbdcopy", f"--connections={conns}", nbd_url, "null:"], [b.agent_pid]
        if kind == "agent-http-vhd":
            return ["curl", "-sSf", "-o", "/dev/null", http_url + "/vhd"], [b.agent_pid]
        spec = {"kind": "agent-nbd" if kind == "agent-nbd" else "agent-http", "connections": conns}
        spec["url"] = nbd_url if kind == "agent-nbd" else http_url
        return [PY, "-m", "orchestrator.benchcmd.drain", json.dumps(spec)], [b.agent_pid]
    if kind in ("xapi-export", "xapi-nbd"):
        spec = {
            "kind": kind,
            "xapi": info["xapi"]["url"],
            "user": info["xapi"]["user"],
            "vdi": disk["vdi"],
            "connections": conns,
        }
        return [PY, "-m", "orchestrator.benchcmd.drain", json.dumps(spec)], [b.hostsim_pid]
    if kind == "qemu-nbd":
        proc, uri = b.start_qemu_nbd(disk["name"], disk["files"][0])
        return ["nbdcopy", f"--connections={conns}", uri, "null:"], [proc.pid]
    if kind == "cat":
        return ["cat", *disk["files"]], []
    raise ValueError(kind)


def host_side(b: Bench, disks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    samples: dict[tuple[str, str], list] = {}
    for run in range(b.opts.runs):
        for name, disk in disks.items():
            for f in disk["files"]:  # page cache warm for every reader alike
                subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
            for kind in HOST_KINDS:
                if kind == "qemu-nbd" and disk["depth"] != 1:
                    continue  # qemu's vpc driver cannot open differencing disks
                cmd, servers = host_side_cmd(b, kind, disk)
                b.opts.say(f"host side run {run + 1}/{b.opts.runs}: {name} {kind}")
                env = child_env({**b.env, "FASTPATH_XAPI_PASSWORD": b.info["xapi"]["password"]})
                sample, _ = run_measured(cmd, servers, env=env)
                samples.setdefault((name, kind), []).append(sample)
    rows = []
    for (name, kind), ss in samples.items():
        label, group = HOST_KINDS[kind]
        rows.append(
            report.make_row(
                f"host/{name}/{kind}",
                "host_side",
                label,
                name,
                disks[name]["allocated_bytes"],
                ss,
                kind=group,
                transport=kind,
                baseline_xapi=f"host/{name}/xapi-export",
                baseline_limit=f"host/{name}/cat",
            )
        )
    report.set_ratios(rows)
    return rows


# -- question 2: end to end ---------------------------------------------------------------------


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
    env = child_env({**b.env, "FASTPATH_PASSPHRASE": PASSPHRASE})
    servers = [b.hostsim_pid, b.agent_pid]
    fractions = {"inc1": 0.01, "inc10": 0.10}
    for run in range(b.opts.runs):
        limits = {(d, "s3" if v.startswith("s3") else "local") for d, _, v in plan}
        for name, where in sorted(limits):
            b.opts.say(f"end to end run {run + 1}/{b.opts.runs}: {name} physical limit ({where})")
            disk = disks[name]
            sample, _ = run_measured(limit_cmd(b, disk, where), [], env=env)
            samples.setdefault((name, "limit", where, "full"), []).append(sample)
        for name, transport, variant in plan:
            disk = disks[name]
            hostsim_gc(b)
            repo = b.new_repo(variant)
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


# -- the command ---------------------------------------------------------------------------------


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


def finish(result: dict[str, Any], opts: Options) -> dict[str, Any]:
    qs = result["questions"]
    tables = {
        "host_side": report.markdown_table(qs["host_side"]["rows"]),
        "end_to_end": report.markdown_table(qs["end_to_end"]["rows"], ("repo", "step")),
    }
    result["headline"] = report.headline(qs)
    tables["headline"] = report.headline_table(result["headline"])
    result["tables"] = tables
    md = os.path.join(opts.out, "bench.md")
    png = os.path.join(opts.out, "bench.png")
    js = os.path.join(opts.out, "bench.json")
    result["files"] = {"markdown": md, "chart": png, "json": js}
    if importlib.util.find_spec("matplotlib") is None:
        result["files"]["chart"] = None
        opts.say("no chart: matplotlib is not installed (pip install 'xcp-fastpath[bench]')")
    else:
        report.chart(qs, png, f"fastpath bench ({result['target']}, runs={opts.runs})")
    with open(md, "w") as f:
        f.write(render(result) + "\n")
    with open(js, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    return result


def render(result: dict[str, Any]) -> str:
    qs = result["questions"]
    p = result["params"]
    lines = [
        f"Data: {result['data']}",
        f"Runs: {p['runs']} (median, min–max), connections: {p['connections']}, "
        f"{p['cpu_count']} CPUs, load average at the end {p['load_average'][0]:.1f}. "
        "GB/s = the disk's allocated bytes / seconds (incrementals: effective rate).",
        "",
        "## Headline: the goals of DESIGN.md in this run",
        "",
        result["tables"]["headline"],
        "",
        f"## {qs['host_side']['title']}",
        "",
        "Ratios: vs XAPI's way = / export_raw_vdi of the same disk; vs limit = / "
        + (qs["host_side"]["limit"] or "(no local limit against a real pool)")
        + ".",
        "",
        result["tables"]["host_side"],
        "",
        f"## {qs['end_to_end']['title']}",
        "",
        "Ratios: vs XAPI's way = / backup --transport xapi-export of the same disk and step "
        "(local repository); vs limit = / the physical limit of the same disk "
        "(copy + fdatasync, or plain S3 objects for S3 repositories).",
        "",
        result["tables"]["end_to_end"],
        "",
        f"Chart: {result['files']['chart']}",
    ]
    return "\n".join(lines)


def run_real_pool(opts: Options) -> dict[str, Any]:
    """Against a real pool (``--xapi URL --vm UUID``): read-only apart from its own snapshots.

    One snapshot of the VM (``[fastpath-bench] …``) is read by every host-side client (the
    agent through its plugin, XAPI's export_raw_vdi, xapi-nbd); then, per transport, a full
    backup and an immediate incremental (``inc0``: nothing changed, the fixed cost) into a fresh
    repository. The physical limit is local: a file of the disk's allocated size (random bytes)
    copied with fdatasync onto the repository's filesystem. Guest writes are not possible here,
    so there are no 1 % / 10 % rows and no cat / qemu-nbd rows (the VHD files are in dom0).
    Every snapshot this run made is destroyed at the end, whatever happens.
    """
    import XenAPI

    from orchestrator.jobs.backup import SNAPSHOT_PREFIX, destroy_snapshot

    password = opts.password or os.environ.get("FASTPATH_XAPI_PASSWORD")
    if password is None:
        raise RuntimeError("--xapi needs --password (or $FASTPATH_XAPI_PASSWORD)")
    os.makedirs(opts.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fastpath-bench-")
    from orchestrator.jobs.xapi_session import XapiTarget, connect

    try:
        session = connect(XapiTarget(opts.xapi, opts.user, password, opts.xapi_cafile))
    except ConnectionError as exc:
        raise RuntimeError(str(exc)) from None
    x = session.xenapi
    t0 = time.time()
    vm = x.VM.get_by_uuid(opts.vm)
    before = set(x.VM.get_snapshots(vm))
    host = x.host.get_all()[0]
    b = Bench(opts, work)
    try:
        snap = x.VM.snapshot(vm, "[fastpath-bench] " + time.strftime("%Y%m%dT%H%M%SZ"))
        disks: dict[str, dict[str, Any]] = {}
        for vbd in x.VM.get_VBDs(snap):
            rec = x.VBD.get_record(vbd)
            if rec["type"] != "Disk" or rec["VDI"] == "OpaqueRef:NULL":
                continue
            vdi = x.VDI.get_record(rec["VDI"])
            name = f"disk{rec['userdevice']}"
            disks[name] = {
                "name": name,
                "vdi": vdi["uuid"],
                "size": int(vdi["virtual_size"]),
                "allocated_bytes": int(vdi["virtual_size"]),  # until XAPI's export tells
                "depth": None,
            }
        if not disks:
            raise RuntimeError(f"VM {opts.vm} has no disks")
        common = {"xapi": opts.xapi, "user": opts.user, "cafile": opts.xapi_cafile}
        env = child_env({"FASTPATH_XAPI_PASSWORD": password})
        samples: dict[tuple[str, str], list] = {}
        kinds = {
            "agent-nbd": ("agent NBD (orchestrator reader, via the plugin)", "fast path"),
            "agent-http-blocks": ("agent HTTP blocks stream (via the plugin)", "fast path"),
            "xapi-export": HOST_KINDS["xapi-export"],
            "xapi-nbd": HOST_KINDS["xapi-nbd"],
        }
        for run in range(opts.runs):
            for name, disk in disks.items():
                for kind in kinds:
                    opts.say(f"host side run {run + 1}/{opts.runs}: {name} {kind}")
                    ticket = None
                    if kind.startswith("agent"):
                        transport = "nbd" if kind == "agent-nbd" else "http"
                        args = {"vdi": disk["vdi"], "transports": transport, "ttl": "3600"}
                        try:
                            text = x.host.call_plugin(host, "fastpath", "open_export", args)
                        except XenAPI.Failure as exc:
                            opts.say(f"  agent plugin unavailable ({exc.details}): row skipped")
                            continue
                        export = json.loads(text)
                        ticket = export.get("ticket")
                        spec = {"kind": f"{kind.split('-blocks')[0]}-plugin", "export": export}
                    else:
                        spec = {"kind": kind, "vdi": disk["vdi"], **common}
                    spec["connections"] = opts.connections
                    cmd = [PY, "-m", "orchestrator.benchcmd.drain", json.dumps(spec)]
                    try:
                        sample, out = run_measured(cmd, [], env=env)
                        sample["bytes_read"] = json.loads(out.strip().splitlines()[-1])["bytes"]
                    finally:
                        if ticket:
                            x.host.call_plugin(host, "fastpath", "close_export", {"ticket": ticket})
                    samples.setdefault((name, kind), []).append(sample)
        for name, disk in disks.items():  # what XAPI's export carried: the allocated blocks
            got = [s["bytes_read"] for s in samples.get((name, "xapi-export"), [])]
            if got:
                disk["allocated_bytes"] = max(got)
        host_rows = [
            report.make_row(
                f"host/{name}/{kind}",
                "host_side",
                kinds[kind][0],
                name,
                disks[name]["allocated_bytes"],
                ss,
                kind=kinds[kind][1],
                transport=kind,
                baseline_xapi=f"host/{name}/xapi-export",
            )
            for (name, kind), ss in samples.items()
        ]
        report.set_ratios(host_rows)
        destroy_snapshot(x, snap)
        e2e_rows = real_pool_end_to_end(b, opts, disks, password)
    finally:
        for ref in set(x.VM.get_snapshots(vm)) - before:
            label = x.VM.get_name_label(ref)
            if label.startswith(("[fastpath-bench] ", SNAPSHOT_PREFIX)):
                destroy_snapshot(x, ref)
        try:
            x.session.logout()
        except Exception:
            pass
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "ok": True,
        "target": opts.xapi,
        "data": f"VM {opts.vm} of a real pool (its own data); "
        + "; ".join(f"{n}: {d['size'] >> 20} MiB virtual" for n, d in disks.items()),
        "disks": {
            n: {"size": d["size"], "allocated_bytes": d["allocated_bytes"]}
            for n, d in disks.items()
        },
        "params": {
            "runs": opts.runs,
            "connections": opts.connections,
            "quick": opts.quick,
            "transports": list(opts.transports),
            "steps": ["full", "inc0"],
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "seconds": time.time() - t0,
        "questions": {
            "host_side": {
                "title": "1. Host side: export read by a discarding client (server CPU not "
                "visible from here)",
                "baseline": "xapi-export",
                "limit": None,
                "rows": host_rows,
            },
            "end_to_end": {
                "title": "2. End to end: backup into a repository vs the physical limit",
                "baseline": "xapi-export (same step)",
                "limit": "copy + fdatasync of the same number of bytes",
                "rows": e2e_rows,
            },
        },
    }
    return finish(result, opts)


def real_pool_end_to_end(b: Bench, opts: Options, disks: dict, password: str) -> list[dict]:
    env = child_env({"FASTPATH_XAPI_PASSWORD": password, "FASTPATH_PASSPHRASE": PASSPHRASE})
    total = sum(d["allocated_bytes"] for d in disks.values())
    blob = os.path.join(b.work, "limit-source.bin")
    with open(blob, "wb") as f:
        left = total
        while left > 0:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    samples: dict[tuple[str, str], list] = {}
    for run in range(opts.runs):
        opts.say(f"end to end run {run + 1}/{opts.runs}: physical limit")
        sample, _ = run_measured(limit_cmd(b, {"name": "vm", "files": [blob]}, "local"), [], env)
        samples.setdefault(("limit", ""), []).append(sample)
        for transport in opts.transports:
            repo = b.new_repo("local")
            try:
                for step in ("full", "inc0"):
                    opts.say(f"end to end run {run + 1}/{opts.runs}: {transport} {step}")
                    cmd = [PY, "-m", "orchestrator.cli", "backup", "vm", opts.vm]
                    cmd += ["--xapi", opts.xapi, "--user", opts.user, "--repo", repo]
                    cmd += ["--transport", transport, "--connections", str(opts.connections)]
                    cmd += ["--json", "--progress", "quiet"]
                    if opts.xapi_cafile:
                        cmd += ["--xapi-cafile", opts.xapi_cafile]
                    if transport == "xapi-nbd":
                        cmd.append("--cbt")
                    sample, _ = run_measured(cmd, [], env)
                    samples.setdefault((transport, step), []).append(sample)
            finally:
                b.drop_repo(repo)
    rows = []
    for (transport, step), ss in samples.items():
        if transport == "limit":
            rows.append(
                report.make_row(
                    "e2e/vm/limit/local",
                    "end_to_end",
                    "physical limit: copy + fdatasync",
                    "vm",
                    total,
                    ss,
                    kind="limit",
                    transport="limit",
                    repo="local",
                    step="",
                )
            )
            continue
        rows.append(
            report.make_row(
                f"e2e/vm/{transport}/local/{step}",
                "end_to_end",
                f"backup --transport {transport}",
                "vm",
                total,
                ss,
                kind=TRANSPORT_KIND[transport],
                transport=transport,
                repo="local",
                step=step,
                baseline_xapi=f"e2e/vm/xapi-export/local/{step}",
                baseline_limit="e2e/vm/limit/local",
            )
        )
    report.set_ratios(rows)
    return rows
