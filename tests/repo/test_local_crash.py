"""Local atomicity: a writer killed with SIGKILL in the middle of puts never leaves a torn object
under a final name (only invisible ``.tmp-*`` files, which ``remove_stale_temporaries`` cleans)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import blake3

from orchestrator.repo.backends.local import TMP_PREFIX, LocalBackend

WRITER = r"""
import os, sys, blake3
from orchestrator.repo.backends.local import LocalBackend
b = LocalBackend(sys.argv[1])
seed = int(sys.argv[2])
i = 0
sys.stdout.write("ready\n"); sys.stdout.flush()
while True:
    body = os.urandom(1024 * (1 + (seed * 7919 + i * 104729) % 6144))
    obj = len(body).to_bytes(8, "big") + blake3.blake3(body).digest() + body
    if i % 3 == 2:
        b.put_if_absent("objs/once-%d" % (i % 5), obj)
    else:
        b.put("objs/obj-%d" % (i % 4), obj)
    i += 1
"""


def check_object(data: bytes) -> bool:
    size = int.from_bytes(data[:8], "big")
    body = data[40:]
    return len(body) == size and blake3.blake3(body).digest() == data[8:40]


def test_sigkill_mid_put_never_tears_an_object(tmp_path):
    rng = random.Random(42)
    root = tmp_path / "repo"
    temps_seen = 0
    trials = 0
    # A loaded machine can make many kills land between two puts: keep going (bounded) until
    # some kill landed mid-write.
    while trials < 8 or (temps_seen == 0 and trials < 100):
        trials += 1
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(trials)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=os.getcwd(),
        )
        try:
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.05, 0.4))
            # The writer must still be writing when the kill lands, or this trial proves nothing.
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
        b = LocalBackend(root)
        for info in b.list():
            assert check_object(b.get(info.key)), f"torn object {info.key} after trial {trials}"
        temps_seen += sum(
            1 for _d, _s, files in os.walk(root) for f in files if f.startswith(TMP_PREFIX)
        )
    # The kills did land in the middle of writes (else this test would prove nothing).
    assert temps_seen > 0
    b = LocalBackend(root)
    before = {i.key for i in b.list()}
    assert b.remove_stale_temporaries(older_than=0) > 0
    assert not any(f.startswith(TMP_PREFIX) for _d, _s, files in os.walk(root) for f in files)
    assert {i.key for i in b.list()} == before
