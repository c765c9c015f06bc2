"""ChainGuard, trigger by trigger, on a chain our writer made (contents judged by the bytearray
models of tests.fixtures.vhd.build_chain)."""

import os

import pytest

from agent import vhd
from agent.export import ChainChanged, Export
from tests.fixtures.vhd import Level, build_chain, pattern
from tests.sr.conftest import MiB


@pytest.fixture
def chain_files(tmp_path):
    levels = [
        Level(6 * MiB, [(0, pattern(1, 2 * MiB))]),
        Level(6 * MiB, [(2 * MiB, pattern(2, 2 * MiB))]),
        Level(6 * MiB, [(MiB, pattern(3, 4096))]),
    ]
    paths, models = build_chain(str(tmp_path), levels)
    return paths, models


def _export(paths):
    return Export(vhd.open_chain(paths[-1]), guard=True)


def test_unchanged_chain_reads_and_checks(chain_files):
    paths, models = chain_files
    with _export(paths) as exp:
        for _ in range(3):
            exp.check()
        assert exp.read(0, exp.size) == bytes(models[-1])
        assert exp.guard.checks >= 3


@pytest.mark.parametrize("level", [0, 1, 2], ids=["root", "middle", "leaf"])
@pytest.mark.parametrize("change", ["unlink", "append", "rewrite", "rename"])
def test_each_change(chain_files, level, change):
    paths, models = chain_files
    exp = _export(paths)
    try:
        exp.check()
        path = paths[level]
        if change == "unlink":
            os.unlink(path)
        elif change == "append":
            with open(path, "ab") as f:
                f.write(bytes(512))
        elif change == "rewrite":  # same size, new bytes (a hidden flag, a coalesce in place)
            st = os.stat(path)
            with open(path, "r+b") as f:
                f.seek(st.st_size // 2)
                f.write(b"\xa5" * 512)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        else:
            os.rename(path, path + ".renamed")
        if change == "rename":
            # a rename alone leaves every byte in place: the export goes on (SM's snapshot
            # renames the leaf it snapshots)
            exp.check()
            assert exp.read(0, exp.size) == bytes(models[-1])
            return
        with pytest.raises(ChainChanged) as err:
            exp.check()
        assert paths[level] in str(err.value)
        # sticky: the export stays failed even if the change is undone
        with pytest.raises(ChainChanged):
            exp.read(0, 4096)
    finally:
        exp.close()


def test_holes_are_still_answered_after_a_change(tmp_path):
    paths, models = build_chain(
        str(tmp_path), [Level(8 * MiB, [(0, pattern(4, MiB))]), Level(8 * MiB)]
    )
    exp = _export(paths)
    try:
        with open(paths[0], "ab") as f:
            f.write(bytes(512))
        # [4 MiB, 8 MiB) is unallocated everywhere: answered from the metadata read at open
        assert exp.plan_read(4 * MiB, 4 * MiB) == [("hole", 4 * MiB)]
        with pytest.raises(ChainChanged):
            exp.plan_read(0, MiB)
    finally:
        exp.close()


def test_close_runs_callbacks_once_in_reverse(chain_files):
    paths, _ = chain_files
    order = []

    def boom():
        order.append("boom")
        raise RuntimeError("release failed")

    exp = Export(
        vhd.open_chain(paths[-1]),
        on_close=[lambda: order.append("first"), boom, lambda: order.append("last")],
    )
    exp.close()
    exp.close()
    assert order == ["last", "boom", "first"]
    assert all(f.fileno() < 0 for f in exp.chain.files)
