"""orchestrator/benchcmd/fleet.py on a tiny fleet: its figures against the repository it built, read
back through the `fastpath` commands (list, verify) and the file system rather than through
fleet.py itself."""

import json
import os
import subprocess
import sys

from orchestrator.benchcmd import fleet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fastpath(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "--json", "--progress", "quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tiny_fleet_figures_match_the_repository(tmp_path):
    repo = str(tmp_path / "repo")
    r = fleet.run_fleet(vms=2, days=7, size="8M", out=str(tmp_path / "out"), repo_dir=repo)
    assert r["restore_points"] == 2 * 8
    listed = fastpath("list", repo)["restore_points"]
    assert len(listed) == r["restore_points"]
    # stored bytes = the chunk objects on disk
    on_disk = 0
    for dirpath, _dirs, files in os.walk(os.path.join(repo, "chunks")):
        on_disk += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    assert r["stored_bytes"] == on_disk
    # the repository the figures come from is sound (every chunk readable, digests match)
    verify = fastpath("verify", repo)
    assert verify["ok"] is True
    # ratios are what their definitions say, from the stored numbers
    assert r["dedup_ratio"] == r["logical_bytes"] / (r["unique_chunks"] * 2 * 1024 * 1024)
    assert r["total_reduction"] == r["logical_bytes"] / r["stored_bytes"]
    assert r["dedup_ratio"] >= 1 and r["compression_ratio"] > 1
    # two VMs of one template share most chunks: dedup is real, and the data-side census at
    # 2 MiB agrees with what the repository's lookup holds
    assert r["dedup_ratio"] > 1.5
    assert r["dedup_ratio_2mib_from_data"] == r["dedup_ratio"]
    rec = r["records_128k"]
    assert r["dedup_ratio_128k_records"] == rec["logical"] / rec["unique"]
    assert rec["logical"] * 128 * 1024 <= r["logical_bytes"]  # zero records are skipped
    assert r["lookup_bytes"] == 8 * r["unique_chunks"]
    with open(tmp_path / "out" / "fleet.json") as f:
        assert json.load(f)["stored_bytes"] == r["stored_bytes"]
    assert "128 KiB" in (tmp_path / "out" / "fleet.md").read_text()


def test_fleet_switch_of_the_command(tmp_path):
    out = fastpath(
        "bench", "--fleet", "--vms", "2", "--days", "1", "--size", "4M", "--out", str(tmp_path)
    )
    assert out["fleet"] is True and out["restore_points"] == 4
    assert (tmp_path / "fleet.md").exists()
