"""NBD BLOCK_STATUS stays small on a sector-fragmented disk (issue 13, "Bounded and fair").

Each reply carries at most max_descriptors descriptors (8192 by default); libnbd and nbdinfo --map
ask again from where a reply ended and still get the whole map. The agent's peak RSS (VmHWM) is read
before and after: the old answer was one reply for the whole range (2 GiB: 4,194,303 descriptors,
+390 MB).
"""

import json
import subprocess
import uuid

import pytest

from tests.fixtures.fragmented import SECTOR, fragmented_vhd, is_absent, reset_hwm, vm_hwm_kib

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
CAP = 8192


@pytest.fixture
def fragmented(file_sr, agent_proc):
    vdi = str(uuid.uuid4())
    size = 64 * MiB  # 131,072 extents: 16 capped replies
    fragmented_vhd(file_sr.path(vdi), size)
    agent = agent_proc([file_sr.root])
    return agent, agent.ticket(vdi), size


def test_libnbd_gets_the_whole_map_from_capped_replies(fragmented):
    agent, ticket, size = fragmented
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(agent.uri(ticket))
    try:
        # the export's own block size is the preferred one
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 2 * MiB
        reset_hwm(agent.pid)
        before = vm_hwm_kib(agent.pid)
        replies = []
        pos = 0
        got = []

        def cb(ctx, offset, entries, err):
            assert ctx == "base:allocation"
            got.append(list(entries))
            return 0

        while pos < size:
            del got[:]
            h.block_status(size - pos, pos, cb)
            entries = got[0]
            replies.append(len(entries) // 2)
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                assert length == SECTOR
                assert bool(flags & nbd.STATE_HOLE) == is_absent(pos), pos
                pos += length
        after = vm_hwm_kib(agent.pid)
    finally:
        h.shutdown()
    assert pos == size
    assert max(replies) == CAP and len(replies) == size // SECTOR // CAP
    grew_mib = (after - before) / 1024.0
    print(
        "BLOCK_STATUS of %d MiB: %d replies of <= %d descriptors, agent VmHWM %d -> %d KiB (+%.1f MiB)"
        % (size // MiB, len(replies), max(replies), before, after, grew_mib)
    )
    assert grew_mib < 16, grew_mib


def test_nbdinfo_map_covers_the_disk(fragmented):
    agent, ticket, size = fragmented
    r = subprocess.run(
        ["nbdinfo", "--map", "--json", agent.uri(ticket)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)
    assert len(runs) == size // SECTOR
    pos = 0
    for run in runs:
        assert run["offset"] == pos and run["length"] == SECTOR
        assert (run["type"] == 3) == is_absent(pos)
        pos += SECTOR
    assert pos == size
