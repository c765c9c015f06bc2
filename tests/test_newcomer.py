"""The first thing a newcomer runs: README's "Using it" block, as written (issue 18).

The block is taken from README.md itself (the first ``sh`` block under "## Using it") and run by
bash with ``set -e`` in a temporary directory; the only change is where it writes: /tmp/pool and
/srv/backups become directories of the test's own. A command that fails, or a README edit that
breaks the sequence, fails this test with the block's output."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def using_it_block() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README's Using it section has no sh block"
    return match.group(1)


def test_the_block_is_what_a_newcomer_reads():
    block = using_it_block()
    first = block.splitlines()[0]
    assert first.startswith("hostsim serve") and "--daemon" in first
    assert "fastpath backup vm" in block and "fastpath restore" in block
    assert block.rstrip().endswith("hostsim stop")


def test_readme_using_it_runs_as_written(tmp_path):
    pool, backups = tmp_path / "pool", tmp_path / "backups"
    script = using_it_block().replace("/tmp/pool", str(pool)).replace("/srv/backups", str(backups))
    bindir = os.path.dirname(sys.executable)  # the venv's hostsim, fastpath
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    for var in (
        "HOSTSIM_ROOT",
        "FASTPATH_XAPI_URL",
        "FASTPATH_XAPI_PASSWORD",
        "FASTPATH_PASSPHRASE",
    ):
        env.pop(var, None)
    try:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:  # a failed step must not leave the pool running
        subprocess.run(
            [os.path.join(bindir, "hostsim"), "stop", "--root", str(pool)],
            capture_output=True,
            timeout=120,
        )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    restored = tmp_path / "disk.vhd"
    assert restored.stat().st_size > 0
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(restored)], capture_output=True, text=True
    )
    assert info.returncode == 0 and '"format": "vpc"' in info.stdout
    assert not (pool / "hostsim.json").exists()  # hostsim stop really stopped it
