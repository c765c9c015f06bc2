"""The zero-copy path: blocks that live whole in one VHD file go out with os.sendfile, blocks split
across the chain are assembled in memory, unallocated blocks are holes. Counted through the admin
API's stats (what the server actually did), with the data checked against the model."""

import shutil

import pytest

from tests.fixtures.nbd import run
from tests.fixtures.vhd import Level, pattern

MiB = 1 << 20
BS = 2 * MiB


def levels():
    size = 6 * BS
    return [
        Level(size, [(0, pattern(1, 2 * BS))]),  # root: blocks 0, 1
        Level(size, [(BS + 4096, pattern(2, 8192)), (3 * BS, pattern(3, BS))]),  # mid: 1 (part), 3
        Level(size, [(0, pattern(4, BS)), (4 * BS + 512, pattern(5, 1024))]),  # leaf: 0, 4 (part)
    ]


# Per block: 0 whole in the leaf, 1 split root+mid, 2 nowhere, 3 whole in mid, 4 partial leaf,
# 5 nowhere.
FILE_BLOCKS = [0, 3]
ASSEMBLED_BLOCKS = [1, 4]
HOLE_BLOCKS = [2, 5]


def delta(before, after, key):
    return after.get(key, 0) - before.get(key, 0)


def test_whole_blocks_sendfile_split_blocks_assembled(file_sr, agent_proc):
    nbd = pytest.importorskip(
        "nbd", reason="libnbd Python bindings (python3-libnbd) not importable"
    )
    vdis, models = file_sr.chain(levels())
    model = bytes(models[-1])
    agent = agent_proc([file_sr.root])
    h = nbd.NBD()
    h.connect_uri(agent.uri(agent.ticket(vdis[-1])))
    for i in range(6):
        before = agent.stats()
        assert h.pread(BS, i * BS) == model[i * BS : (i + 1) * BS]
        after = agent.stats()
        sent = (delta(before, after, "sendfile_pieces"), delta(before, after, "sendfile_bytes"))
        assembled = (
            delta(before, after, "assembled_pieces"),
            delta(before, after, "assembled_bytes"),
        )
        holes = (delta(before, after, "hole_pieces"), delta(before, after, "hole_bytes"))
        if i in FILE_BLOCKS:
            assert (sent, assembled, holes) == ((1, BS), (0, 0), (0, 0)), i
        elif i in ASSEMBLED_BLOCKS:
            assert (sent, assembled, holes) == ((0, 0), (1, BS), (0, 0)), i
        else:
            assert (sent, assembled, holes) == ((0, 0), (0, 0), (1, BS)), i
    # A partial range inside a whole-in-one-file block still goes zero-copy.
    before = agent.stats()
    assert h.pread(4096, 3 * BS + 12345) == model[3 * BS + 12345 : 3 * BS + 12345 + 4096]
    assert delta(before, agent.stats(), "sendfile_bytes") == 4096
    # One request spanning everything: one piece per block kind run.
    before = agent.stats()
    assert h.pread(6 * BS, 0) == model
    after = agent.stats()
    assert delta(before, after, "sendfile_bytes") == len(FILE_BLOCKS) * BS
    assert delta(before, after, "assembled_bytes") == len(ASSEMBLED_BLOCKS) * BS
    assert delta(before, after, "hole_bytes") == len(HOLE_BLOCKS) * BS
    h.shutdown()


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="nbdcopy not installed")
def test_nbdcopy_skips_holes_and_uses_sendfile(file_sr, agent_proc, tmp_path):
    vdis, models = file_sr.chain(levels())
    agent = agent_proc([file_sr.root])
    before = agent.stats()
    out = str(tmp_path / "out.raw")
    run(["nbdcopy", agent.uri(agent.ticket(vdis[-1])), out])
    assert open(out, "rb").read() == bytes(models[-1])
    after = agent.stats()
    assert delta(before, after, "sendfile_bytes") == len(FILE_BLOCKS) * BS
    assert delta(before, after, "assembled_bytes") == len(ASSEMBLED_BLOCKS) * BS
    assert delta(before, after, "pread_bytes") == 0
