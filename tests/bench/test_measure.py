"""run_measured: each measured process's own CPU and peak RSS, the servers' CPU from /proc, and
failures that name the command (no timing thresholds: sizes and signs only)."""

import os
import subprocess
import sys

import pytest

from orchestrator.benchcmd.measure import proc_cpu, proc_hwm, run_measured

MiB = 1 << 20


def test_peak_rss_is_the_child_own_not_inherited_from_the_bench():
    big = bytearray(300 * MiB)  # this process is big: a child forked from it must not look big
    big[::4096] = b"x" * len(big[::4096])
    small, _ = run_measured(["true"])
    assert small["client_rss"] < 64 * MiB
    code = "b = bytearray(80 << 20); b[::4096] = b'x' * len(b[::4096])"
    sample, _ = run_measured([sys.executable, "-c", code])
    assert 80 * MiB <= sample["client_rss"] < 300 * MiB
    del big


def test_cpu_of_the_child_and_of_a_server():
    sample, out = run_measured([sys.executable, "-c", "print(sum(range(3_000_000)))"])
    assert out.strip() == str(sum(range(3_000_000)))
    assert sample["client_cpu"] > 0 and sample["seconds"] > 0
    assert sample["server_cpu"] is None and sample["server_rss"] is None
    server = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout.readline() == b"ready\n"
        sample, _ = run_measured(["true"], [server.pid])
        assert sample["server_cpu"] >= 0
        assert 0 < sample["server_rss"] <= proc_hwm(server.pid)
        assert proc_cpu(server.pid) >= 0
    finally:
        server.kill()
        server.wait()


def test_failures_name_the_command():
    with pytest.raises(RuntimeError, match="exited with 3.*boom"):
        run_measured([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match="sleep"):
        run_measured(["sleep", "30"], timeout=1)


def test_no_temporary_files_left(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run_measured(["true"])
    with pytest.raises(RuntimeError):
        run_measured(["false"])
    assert os.listdir(tmp_path) == []


def test_interrupted_measurement_stops_its_child(tmp_path):
    """Ctrl-C while a measured command runs: the command (in its own session) is killed too."""
    import signal
    import threading

    marker = tmp_path / "pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(3600)"

    def interrupt():
        while not marker.exists() or not marker.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    import time

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        run_measured([sys.executable, "-c", code], timeout=120)
    child = int(marker.read_text())
    deadline = time.monotonic() + 30
    while True:  # gone, or a zombie waiting for its new parent to reap it
        try:
            with open(f"/proc/{child}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        assert time.monotonic() < deadline, f"measured process {child} still running ({state})"
        time.sleep(0.05)
