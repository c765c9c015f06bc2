"""End-to-end fixtures: a real `hostsim serve` subprocess (XAPI, file SR, xapi-nbd, the fastpath
agent with TLS, the plugin) on a temporary root, and helpers to run `fastpath` commands in-process
and to read disks back through paths we did not write (XAPI's export_raw_vdi, qemu-img).
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlencode

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
START_TIMEOUT = 90


class Sim:
    def __init__(self, root, vms=4, disk_size="8M", tls=False, extra=(), image_format="vhd"):
        self.root = str(root)
        self.log_path = os.path.join(self.root, "hostsim.log")
        os.makedirs(self.root, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hostsim.cli",
                "serve",
                "--root",
                self.root,
                "--vms",
                str(vms),
                "--disk-size",
                disk_size,
                "--gc-interval",
                "0",
            ]
            + (["--tls"] if tls else [])
            + list(extra)
            + (["--image-format", image_format] if image_format != "vhd" else []),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        state = os.path.join(self.root, "hostsim.json")
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(state):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("hostsim did not start:\n" + self.log())
            time.sleep(0.1)
        with open(state) as f:
            self.info = json.load(f)
        self.url = self.info["xapi"]["url"]
        self._session = None

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-5000:]

    @property
    def session(self):
        if self._session is None:
            import XenAPI

            s = XenAPI.Session(self.url)
            s.xenapi.login_with_password("root", "hostsim", "2.21", "e2e")
            self._session = s
        return self._session

    @property
    def x(self):
        return self.session.xenapi

    def vm(self, k):
        return self.info["vms"][k]["uuid"]

    def vm_disk(self, k):
        return self.info["vms"][k]["vdis"][0]

    def write(self, vm_uuid, **spec):
        ref = self.x.VM.get_by_uuid(vm_uuid)
        spec = {k: str(v) for k, v in spec.items()}
        return self.session.xenapi_request("hostsim.write", (ref, spec))

    def gc(self):
        return self.session.xenapi_request("hostsim.gc", ())

    def export_raw(self, vdi_uuid):
        """The VDI's bytes as XAPI's export_raw_vdi?format=raw gives them."""
        q = urlencode({"session_id": self.session._session, "vdi": vdi_uuid, "format": "raw"})
        with urllib.request.urlopen(f"{self.url.rstrip('/')}/export_raw_vdi?{q}", timeout=60) as r:
            return r.read()

    def fastpath_snapshots(self, vm_uuid):
        vm_ref = self.x.VM.get_by_uuid(vm_uuid)
        out = []
        for ref in self.x.VM.get_all():
            rec = self.x.VM.get_record(ref)
            if (
                rec["is_a_snapshot"]
                and rec["snapshot_of"] == vm_ref
                and rec["name_label"].startswith("[fastpath ")
            ):
                out.append(rec["uuid"])
        return out

    def agent_pid(self):
        return self.info["agent"]["pid"]

    def stop(self):
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.xenapi.session.logout()
            self._session = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = Sim(tmp_path_factory.mktemp("hostsim"), vms=4)
    yield s
    s.stop()


@pytest.fixture
def own_sim(tmp_path):
    """A hostsim of its own, for tests that break the agent."""
    s = Sim(tmp_path / "hostsim", vms=1)
    yield s
    s.stop()


def fastpath(*args, expect=0):
    """Run `fastpath ARGS --json` in-process; returns the JSON result."""
    from orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args] + ["--json"])
    text = out.getvalue().strip()
    assert code == expect, (
        f"fastpath {' '.join(map(str, args))} -> {code}\n{err.getvalue()}\n{text}"
    )
    result = json.loads(text.splitlines()[-1]) if text else {}
    result["_stderr"] = err.getvalue()
    return result


def qemu_raw(path, tmp_path):
    out = os.path.join(str(tmp_path), os.path.basename(str(path)) + ".qemu.raw")
    subprocess.run(
        ["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), out],
        check=True,
        timeout=60,
        capture_output=True,
    )
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


@pytest.fixture
def repo_factory(tmp_path, request, monkeypatch):
    """make(kind, encrypted) -> repository URL (local dir or s3:// on the moto server)."""

    def make(kind="local", encrypted=False, name="repo"):
        if kind == "local":
            url = str(tmp_path / name)
        else:
            s3 = request.getfixturevalue("s3_env")
            url = s3.url + "-" + name
        args = ["repo", "init", url]
        if encrypted:
            pw = tmp_path / "passphrase"
            pw.write_text("correct horse battery staple\n")
            monkeypatch.setenv("FASTPATH_PASSPHRASE", "correct horse battery staple")
            # a cheap scrypt for tests (the repository records its own parameters)
            monkeypatch.setenv("FASTPATH_INSECURE_TEST_KDF_N", "1024")
            args += ["--encrypt", "--passphrase-file", str(pw)]
        fastpath(*args)
        return url

    return make
