"""agent.sr: uuids are checked, paths stay inside the SR roots (leaf and every parent)."""

import os
import shutil
import uuid

import pytest

from agent import sr as sr_mod
from tests.fixtures.vhd import Level, pattern

MiB = 1 << 20


@pytest.mark.parametrize(
    "value",
    [
        "",
        "../etc/passwd",
        "AAAAAAAA-0000-0000-0000-000000000001",  # not lowercase
        "aaaaaaaa00000000000000000000000001",
        "{aaaaaaaa-0000-0000-0000-000000000001}",
        "aaaaaaaa-0000-0000-0000-000000000001/..",
        "aaaaaaaa-0000-0000-0000-00000000000g",
        "aaaaaaaa-0000-0000-0000-000000000001\n",
        None,
        42,
    ],
)
def test_uuid_validation(value):
    with pytest.raises(sr_mod.InvalidUUID):
        sr_mod.check_uuid(value)


def test_resolve_with_and_without_sr(file_sr):
    vdi = file_sr.qemu_vdi(MiB)
    sr = sr_mod.FileSR([file_sr.root])
    assert sr.resolve_vdi(vdi, file_sr.sr) == file_sr.path(vdi)
    assert sr.resolve_vdi(vdi) == file_sr.path(vdi)
    with pytest.raises(sr_mod.VDINotFound):
        sr.resolve_vdi(str(uuid.uuid4()))
    with pytest.raises(sr_mod.VDINotFound):
        sr.resolve_vdi(vdi, str(uuid.uuid4()))


def test_symlink_leaving_the_roots_is_refused(file_sr, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    vdi = str(uuid.uuid4())
    target = outside / "secret.vhd"
    from tests.fixtures.nbd import qemu_vhd

    qemu_vhd(target, MiB)
    os.symlink(str(target), file_sr.path(vdi))
    with pytest.raises(sr_mod.OutsideRoots):
        sr_mod.FileSR([file_sr.root]).resolve_vdi(vdi, file_sr.sr)
    # An SR directory that is a symlink out of the roots is refused the same way.
    sr2 = str(uuid.uuid4())
    os.symlink(str(outside), os.path.join(file_sr.root, sr2))
    shutil.copy(str(target), str(outside / (vdi + ".vhd")))
    with pytest.raises(sr_mod.OutsideRoots):
        sr_mod.FileSR([file_sr.root]).resolve_vdi(vdi, sr2)


def test_parent_outside_the_roots_is_refused(file_sr, tmp_path):
    """A differencing VHD whose parent locator points outside the roots (here: the parent was
    moved out and the child's directory holds a symlink to it) must not be opened."""
    vdis, _ = file_sr.chain(
        [Level(4 * MiB, [(0, pattern(1, MiB))]), Level(4 * MiB, [(MiB, pattern(2, 512))])]
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    parent = file_sr.path(vdis[0])
    moved = str(outside / os.path.basename(parent))
    shutil.move(parent, moved)
    os.symlink(moved, parent)
    sr = sr_mod.FileSR([file_sr.root])
    with pytest.raises(sr_mod.OutsideRoots):
        sr.open_chain(vdis[1], file_sr.sr)


def test_chain_inside_roots_opens(file_sr):
    vdis, models = file_sr.chain(
        [Level(4 * MiB, [(0, pattern(1, MiB))]), Level(4 * MiB, [(MiB, pattern(2, 512))])]
    )
    with sr_mod.FileSR([file_sr.root]).open_chain(vdis[1]) as chain:
        assert len(chain.files) == 2
        assert chain.read(0, 4 * MiB) == bytes(models[1])
