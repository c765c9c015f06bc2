"""Per-command work of `fastpath backup vm` moved off the critical path must still happen:
the export tickets (revoked in the background, overlapping the snapshot rotation) are all
revoked by the time the command returns (full and incremental)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.conftest import ROOT, fastpath


def agent_tickets(sim) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "ticket", "list", "--json"]
        + ["--admin-socket", sim.info["agent"]["admin_socket"]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    ).stdout
    doc = json.loads(out)
    return doc["tickets"] if isinstance(doc, dict) else doc


def test_tickets_are_revoked_when_backup_returns(sim, repo_factory):
    repo = repo_factory("local")
    vm = sim.vm(1)
    before = {t["id"] for t in agent_tickets(sim)}
    args = ["backup", "vm", vm, "--hostsim", sim.root, "--repo", repo, "--transport", "nbd"]
    for _ in range(2):  # full, then incremental (a ticket with a base)
        r = fastpath(*args)
        snaps = {d["snapshot_vdi"] for d in r["disks"]}
        mine = [t for t in agent_tickets(sim) if t["id"] not in before and t["vdi"] in snaps]
        assert len(mine) == len(snaps), mine  # one ticket per disk was opened
        assert all(t["revoked"] for t in mine), mine
        before |= {t["id"] for t in mine}
