"""The `sh` examples of docs/operations.md, run as written (one bash session, `set -euo pipefail`),
against hostsim and a moto server on a temporary directory, so the documentation stays true.
And every `fastpath …` command line shown in the docs names a command that exists."""

import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs")


def sh_blocks(path):
    with open(path) as f:
        text = f.read()
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def env_for_docs(tmp_path):
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["TMPDIR"] = str(tmp_path)
    env["FASTPATH_INSECURE_TEST_KDF_N"] = "1024"  # the doc's encrypted repository opens fast
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "HOSTSIM_ROOT"):
        env.pop(var, None)
    return env


@pytest.mark.slow
def test_operations_examples_run_as_written(tmp_path):
    blocks = sh_blocks(os.path.join(DOCS, "operations.md"))
    assert len(blocks) >= 8
    script = "set -euo pipefail\n" + "\n".join(blocks)
    # if anything fails, do not leave hostsim or moto behind
    script = (
        "trap 'kill ${MOTO_PID:-} 2>/dev/null || true; "
        '[ -z "${HOSTSIM_ROOT:-}" ] || hostsim stop --root "$HOSTSIM_ROOT" '
        ">/dev/null 2>&1 || true' EXIT\n" + script
    )
    # its own process group: hostsim or moto left running cannot hold our pipes past the timeout
    proc = run_in_own_group(script, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n---\n" + proc.stderr[-3000:]
    out = proc.stdout
    assert "restore point" in out  # backup vm's summary
    assert "file format: vpc" in out  # qemu-img info reads the restored VHD
    assert "Images are identical." in out  # qemu-img compare: VHD vs raw restore


COMMANDS = (
    "repo init",
    "backup vm",
    "backup vdi",
    "restore",
    "list",
    "show",
    "stats",
    "prune",
    "gc",
    "verify",
    "check",
    "worker",
    "bench",
)


def test_every_fastpath_command_in_the_docs_exists():
    """`fastpath X --help` exits 0 for every command the docs show (usage errors would be 2)."""
    seen = set()
    for name in ("operations.md", "nbd.md", "repository-format.md", "benchmarks.md"):
        with open(os.path.join(DOCS, name)) as f:
            for m in re.finditer(r"(?<![\w/-])fastpath ([a-z]+)(?: ([a-z]+))?", f.read()):
                first, second = m.group(1), m.group(2)
                if f"{first} {second}" in COMMANDS:
                    seen.add(f"{first} {second}")
                elif first in COMMANDS:
                    seen.add(first)
    assert {"backup vm", "restore", "prune", "gc", "verify", "worker", "bench"} <= seen
    for command in sorted(seen):
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *shlex.split(command), "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (command, proc.stderr)


def _group_pids(pgid):
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # state, ppid, pgrp
            pids.append(int(name))
    return pids


def _describe(pid):
    """What a process left in the group is doing: its command line, and its Python stacks."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return f"{pid}: gone"
    if not cmd:
        return f"{pid}: exited (not reaped yet)"
    out = f"{pid}: {cmd}"
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if "python" in cmd and os.path.exists(spy):
        try:
            dump = subprocess.run(
                [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
            )
            out += "\n" + (dump.stdout or dump.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            out += "\n(py-spy timed out)"
    return out


def run_in_own_group(script, tmp_path, timeout):
    """bash -c script in a process group of its own. Whatever the block started in the background
    (the agent) holds our stdout/stderr pipes, so a process that does not exit hangs the pipes
    even after bash is gone: on timeout, fail naming every process left (with its Python stacks),
    and in every case kill the group, so nothing outlives the test."""
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=str(tmp_path),
        env=env_for_docs(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    left = None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        left = "\n\n".join(_describe(pid) for pid in _group_pids(proc.pid))
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left is not None:
        pytest.fail(f"the block hung; last steps:\n{err[-3000:]}\nprocesses left:\n{left}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_nbd_try_it_block_runs(tmp_path):
    """docs/nbd.md's "Try it" block on a temporary SR (its three settings replaced)."""
    from agent import vhd

    (block,) = sh_blocks(os.path.join(DOCS, "nbd.md"))
    sr_root = tmp_path / "sr-mount"
    sr = sr_root / "7d2b4c1e-0000-4000-8000-000000000001"
    sr.mkdir(parents=True)
    vdi = "4af55ee4-fad1-440a-8b5b-e568b2e10b48"
    with vhd.create_dynamic(str(sr / f"{vdi}.vhd"), 8 << 20) as w:
        w.write(2 << 20, os.urandom(1 << 20))
    import socket

    # The block names a fixed port: pick a free one; another test may take it between our probe
    # and the agent's bind, which the block reports as the agent exiting ("Address already in
    # use"); then try another port.
    for _attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = {"SR_ROOT": str(sr_root), "VDI": vdi, "PORT": str(port)}
        lines = []
        for line in block.splitlines():
            name = line.split("=", 1)[0]
            lines.append(f"{name}={shlex.quote(settings[name])}" if name in settings else line)
        # set -x: if a step ever hangs, the failure names it (a CI run once timed out here).
        script = "set -xeuo pipefail\ntrap 'kill ${AGENT_PID:-} 2>/dev/null || true' EXIT\n"
        script += "\n".join(lines)
        proc = run_in_own_group(script, tmp_path, timeout=180)
        if "Address already in use" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n---\n" + proc.stderr[-3000:]
    # no base: every allocated block is "changed" (block 1 of 4)
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert ["2097152", "2097152", "1"] in rows
    assert "restore point" in proc.stdout
