"""Local atomicity: a writer killed with SIGKILL in the middle of puts never leaves a torn object
under a final name (only invisible ``.tmp-*`` files, which ``remove_stale_temporaries`` cleans)."""

from __future__ import annotations

import os
import random

import blake3

from orchestrator.repo.backends.local import TMP_PREFIX, LocalBackend
from tests.repo import crashpoints

WRITER = r"""
import os, sys, blake3
from orchestrator.repo.backends.local import LocalBackend
from tests.repo.crashpoints import arm
root, seed, point, nth = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if point != "random":
    arm(point, nth, "/objs/")
b = LocalBackend(root)
i = 0
sys.stdout.write("ready\n"); sys.stdout.flush()
while point == "random" or i < 100:  # an armed point is reached in the first few puts
    body = os.urandom(1024 * (1 + (seed * 7919 + i * 104729) % 6144))
    obj = len(body).to_bytes(8, "big") + blake3.blake3(body).digest() + body
    if i % 3 == 2:
        b.put_if_absent("objs/once-%d" % (i % 5), obj)
    else:
        b.put("objs/obj-%d" % (i % 4), obj)
    i += 1
sys.exit("kill point %s %d never reached" % (point, nth))
"""

# (point, n, whether the kill leaves a temporary behind). Each i of WRITER writes one object
# (put_if_absent of an existing once-* writes nothing); the first put_if_absent that links is
# in the first 3 puts of a child while some once-* is missing, so the link points come first.
KILL_POINTS = [
    ("after-link", 1, True),  # put_if_absent: final name linked, temporary not yet unlinked
    ("after-link", 1, True),
    ("mid-write", 1, True),  # half of an object written
    ("mid-write", 4, True),
    ("mid-write", 7, True),
    ("before-rename", 2, True),  # complete and fsynced under its temporary name only
    ("after-rename", 4, False),  # renamed, directory not yet fsynced
]
RANDOM_KILLS = 8


def check_object(data: bytes) -> bool:
    size = int.from_bytes(data[:8], "big")
    body = data[40:]
    return len(body) == size and blake3.blake3(body).digest() == data[8:40]


def test_sigkill_mid_put_never_tears_an_object(tmp_path):
    """kill -9 of a putting process, exactly at chosen points of a put (the child stops itself
    there and reports, see tests/repo/crashpoints.py) and at random instants: every object
    under a final name is whole. A put that wrote in place, or renamed/linked before the data
    was complete, leaves a torn object at the mid-write kills and fails ``check_object``; the
    temporaries each chosen point leaves are then what ``remove_stale_temporaries`` must clean
    (deterministically some: no longer "if a random kill happened to land mid-write")."""
    rng = random.Random(42)
    root = tmp_path / "repo"
    trials = KILL_POINTS + [("random", 0, None)] * RANDOM_KILLS
    for seed, (point, nth, window) in enumerate(trials, 1):
        before = count_temps(root)
        proc = crashpoints.spawn(WRITER, root, seed, point, nth)
        if point == "random":
            crashpoints.kill_after(proc, rng.uniform(0.05, 0.4))
        else:
            assert crashpoints.kill_at_point(proc) == f"{point} {nth}"
        b = LocalBackend(root)
        for info in b.list():
            assert check_object(b.get(info.key)), f"torn object {info.key} after {point} {nth}"
        if window:
            assert count_temps(root) > before, f"kill at {point} {nth} left no temporary"
    b = LocalBackend(root)
    before = {i.key for i in b.list()}
    assert {"objs/once-2", "objs/once-0"} <= before  # the linked objects are whole and listed
    assert b.remove_stale_temporaries(older_than=-1) >= len(KILL_POINTS) - 1
    assert count_temps(root) == 0
    assert {i.key for i in b.list()} == before


def count_temps(root) -> int:
    return sum(1 for _d, _s, files in os.walk(root) for f in files if f.startswith(TMP_PREFIX))
