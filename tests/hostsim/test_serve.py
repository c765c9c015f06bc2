"""`hostsim serve` as the demo and the benchmarks run it: a subprocess, hostsim.json, the agent, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import XenAPI

from hostsim import cli

START_TIMEOUT = 120


def wait_for_file(path, proc, timeout=START_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(
                "hostsim serve exited with %s: %s" % (proc.returncode, proc.stdout.read())
            )
        if time.monotonic() > deadline:
            raise AssertionError("hostsim.json did not appear")
        time.sleep(0.05)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "root"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hostsim.cli",
            "serve",
            "--root",
            str(root),
            "--vms",
            "2",
            "--disk-size",
            "4M",
            "--gc-interval",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_file(root / "hostsim.json", proc)
        with open(root / "hostsim.json") as f:
            info = json.load(f)
        yield root, info, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def run_cli(root, *args):
    return subprocess.run(
        [sys.executable, "-m", "hostsim.cli", *args, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_writes_hostsim_json_once_everything_answers(served):
    root, info, proc = served
    s = XenAPI.Session(info["xapi"]["url"])
    s.xenapi.login_with_password(info["xapi"]["user"], info["xapi"]["password"], "2.21", "t")
    try:
        x = s.xenapi
        vms = {
            r["name_label"]: r for r in x.VM.get_all_records().values() if not r["is_a_template"]
        }
        assert sorted(vms) == ["vm1", "vm2"]
        assert all(r["power_state"] == "Running" for r in vms.values())
        assert [v["name"] for v in info["vms"]] == ["vm1", "vm2"]
        for vm in info["vms"]:
            (uuid,) = vm["vdis"]
            rec = x.VDI.get_record(x.VDI.get_by_uuid(uuid))
            assert rec["cbt_enabled"] is True
            assert os.path.exists(os.path.join(info["sr"]["path"], uuid + ".vhd"))
            # fast clones of the template: differencing leaves over a shared base
            assert rec["sm_config"]["vhd-parent"]
        assert info["sr"]["root"] == os.path.dirname(info["sr"]["path"])
        if info["agent"] is not None:
            host = x.host.get_all()[0]
            status = json.loads(x.host.call_plugin(host, "fastpath", "status", {}))
            assert status["running"] is True
            opened = json.loads(
                x.host.call_plugin(
                    host, "fastpath", "open_export", {"vdi": info["vms"][0]["vdis"][0]}
                )
            )
            assert opened["size"] == 4 << 20
    finally:
        s.xenapi.session.logout()

    out = run_cli(root, "write", "vm1", "--pattern", "text", "--count", "3", "--json")
    assert out.returncode == 0, out.stderr
    (writes,) = json.loads(out.stdout).values()
    assert len(writes) == 3
    bad = run_cli(root, "write", "no-such-vm")
    assert bad.returncode == 2 and "no VM named" in bad.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert not os.path.exists(root / "hostsim.json")
    if info["agent"] is not None:
        pid = info["agent"]["pid"]
        deadline = time.monotonic() + 30
        while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        status = open("/proc/%d/status" % pid).read() if os.path.exists("/proc/%d" % pid) else ""
        assert (
            "State:\tZ" in status or not status
        )  # gone (or a zombie awaiting its parent's reaper)


def test_cli_without_a_running_hostsim_is_a_usage_error(tmp_path):
    out = run_cli(tmp_path, "write", "vm1")
    assert out.returncode == 2 and "no running hostsim" in out.stderr


@pytest.mark.parametrize(
    "text, value", [("64M", 64 << 20), ("4k", 4096), ("1GiB", 1 << 30), ("512", 512)]
)
def test_parse_size(text, value):
    assert cli.parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(cli.UsageError):
        cli.parse_size("lots")
