"""`make demo` is the first command of the README: it must keep passing. Run here with small
disks (the demo checks itself: qemu-img compares, nbdinfo/nbdcopy, a restore as a new VM,
prune/gc/verify; any failed check exits non-zero)."""

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_demo_passes_on_small_disks(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "hostsim.demo", "--size", "16", "--vm-size", "32"]
        + ["--workdir", str(tmp_path / "demo")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: hostsim and the agent go with it
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-5000:]
    assert "all checks passed" in out
    assert "new VM" in out and "verify: clean" in out, out[-3000:]
