"""The bench's environment: its options, and the servers and repositories a run measures against.

``Options`` is what ``fastpath bench`` was asked (orchestrator/jobs/bench.py builds it from the
command line). ``Bench`` owns everything a run starts and must stop: the simulated host
(``python -m orchestrator.benchcmd.hostpool``: hostsim's XAPI, SR, xapi-nbd, plugin and the real
agent), ``qemu-nbd`` per flat disk, moto's S3 server (or the user's S3 provider with
``--repo s3://…``), the XAPI session, and the end-to-end repositories (``new_repo`` /
``drop_repo``, one per measured sequence, in the variants local, encrypted, uncompressed, s3,
s3-encrypted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.benchcmd.measure import PY, ROOT, child_env, stop, wait_file

PASSPHRASE = "fastpath-bench"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


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
        """qemu-nbd on TCP loopback, as the agent is reached: a Unix socket would favour it."""
        import socket

        if disk in self.qemu:
            return self.qemu[disk]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "vpc", "-t", "--shared=16", "-b", "127.0.0.1"]
            + ["-p", str(port), "-x", "disk", path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("qemu-nbd did not start") from None
                time.sleep(0.05)
        self.qemu[disk] = (proc, f"nbd://127.0.0.1:{port}/disk")
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
