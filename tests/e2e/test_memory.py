"""Peak RSS of a backup does not grow with the disk: the pipeline keeps a bounded number of
chunks in flight. Two subprocess backups of incompressible VHDs, one 4x the other; their peak
RSS (ru_maxrss of each process) must differ by much less than the extra data (a ratio check on
memory, not a timing)."""

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT

MiB = 1 << 20

MEASURE = r"""
import contextlib, io, json, resource, sys
sys.path.insert(0, {root!r})
from orchestrator.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
print(json.dumps({{"code": code, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "result": out.getvalue()}}))
"""


def make_vhd(path, size, uuid=None):
    from agent.vhd import create_dynamic

    w = create_dynamic(str(path), size, uuid=uuid)
    try:
        step = 4 * MiB
        for off in range(0, size, step):
            w.write(off, os.urandom(step))
    finally:
        w.close()


def backup_peak(source, repo):
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE.format(root=ROOT)]
        + ["backup", "vdi", "--source", str(source), "--repo", str(repo), "--json"]
        # a small pipeline, so that the small disk already fills it
        + ["--read-ahead", "2", "--store-threads", "1", "--connections", "2", "--depth", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 0, out
    result = json.loads(out["result"])
    return out["maxrss_kib"] * 1024, result


@pytest.mark.parametrize("kind", ["file", "nbd"])
def test_peak_rss_does_not_grow_with_disk_size(tmp_path, file_sr, agent_proc, kind):
    """file: the VHD read locally; nbd: the same VHDs served by the agent, read with libnbd
    (this caught libnbd 1.14 keeping every aio_pread buffer alive)."""
    import uuid

    from orchestrator.repo.repository import Repository

    sources = []
    for size in (32 * MiB, 128 * MiB):
        vdi = str(uuid.uuid4())
        make_vhd(file_sr.path(vdi), size, uuid=uuid.UUID(vdi))
        sources.append((vdi, file_sr.path(vdi)))
    if kind == "nbd":
        agent = agent_proc([file_sr.root], extra=["--http-listen", "127.0.0.1:0"])
        sources = [(vdi, agent.uri(agent.ticket(vdi))) for vdi, _path in sources]
    for name in ("r1", "r2"):
        Repository.init(str(tmp_path / name)).close()
    peak_small, r_small = backup_peak(sources[0][1], tmp_path / "r1")
    peak_big, r_big = backup_peak(sources[1][1], tmp_path / "r2")
    # Everything was really read and stored (incompressible: ~all bytes written).
    assert r_small["bytes_read"] == 32 * MiB and r_big["bytes_read"] == 128 * MiB
    assert r_big["bytes_written"] > 120 * MiB
    extra_data = 96 * MiB
    growth = peak_big - peak_small
    print("peak RSS MiB", kind, peak_small / MiB, peak_big / MiB)
    assert growth < 0.25 * extra_data, (peak_small / MiB, peak_big / MiB)
    assert peak_big < 1.3 * peak_small, (peak_small / MiB, peak_big / MiB)
