"""A file SR's directory is written by someone else (an NFS/SMB server): what the agent (root in
dom0) opens must be what it checked. The review's attack: a thread flipping <sr>/<uuid>.vhd between
a VHD and a symlink to an outside file got /raw to serve that file after ~300 tickets, because the
check (realpath) and the open (by path) were two steps. agent.rooted opens by an O_NOFOLLOW walk
from the root and fstat()s the descriptor against the checked file.

The deterministic tests swap the file exactly inside the old window (after the check, before the
open): opening by path would follow the swap; the walk must refuse it. The racing test flips for
real, from another process, while exports are opened and read."""

import os
import subprocess
import sys
import time
import uuid

import pytest

from agent import rooted
from agent import sr as sr_mod
from agent.vhd import VhdError
from tests.fixtures.nbd import qemu_vhd
from tests.fixtures.vhd import Level, pattern

MiB = 1 << 20
LEGIT, SECRET = 0x11, 0x5E


@pytest.fixture
def scene(file_sr, tmp_path):
    """A VDI whose data is 0x11 and, outside the roots, a VHD full of 0x5e (the 'secret')."""
    vdi = str(uuid.uuid4())
    qemu_vhd(file_sr.path(vdi), 2 * MiB, [(0, MiB, LEGIT)])
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = str(outside / "secret.vhd")
    qemu_vhd(secret, 2 * MiB, [(0, MiB, SECRET)])
    return file_sr, vdi, secret


def _swap_after_check(monkeypatch, when, swap):
    """Run swap() right after the check of the path ending in `when`, once."""
    real_check = rooted.check_inside
    done = []

    def check_then_swap(path, roots, what):
        out = real_check(path, roots, what)
        if not done and str(path).endswith(when):
            done.append(path)
            swap()
        return out

    monkeypatch.setattr(rooted, "check_inside", check_then_swap)
    return done


def _symlink_over(link_target, path):
    tmp = path + ".swap"
    os.symlink(link_target, tmp)
    os.replace(tmp, path)


def test_leaf_swapped_for_a_symlink_after_the_check_is_refused(scene, monkeypatch):
    tree, vdi, secret = scene
    leaf = tree.path(vdi)
    done = _swap_after_check(monkeypatch, vdi + ".vhd", lambda: _symlink_over(secret, leaf))
    with pytest.raises(sr_mod.PathChanged) as err:
        sr_mod.FileSR([tree.root]).open_export(vdi)
    assert done, "the swap hook never ran: the test did not exercise the window"
    assert "changed while it was opened" in str(err.value)


def test_parent_swapped_for_a_symlink_after_the_check_is_refused(file_sr, tmp_path, monkeypatch):
    vdis, _ = file_sr.chain(
        [Level(4 * MiB, [(0, pattern(1, MiB))]), Level(4 * MiB, [(MiB, pattern(2, 512))])]
    )
    parent = file_sr.path(vdis[0])
    outside = str(tmp_path / "copy-of-parent.vhd")
    with open(parent, "rb") as src, open(outside, "wb") as dst:
        dst.write(src.read())  # same uuid: only where it lives differs
    done = _swap_after_check(monkeypatch, vdis[0] + ".vhd", lambda: _symlink_over(outside, parent))
    with pytest.raises(sr_mod.PathChanged):
        sr_mod.FileSR([file_sr.root]).open_export(vdis[1])
    assert done


def test_sr_directory_swapped_for_a_symlink_is_refused(scene, tmp_path, monkeypatch):
    tree, vdi, secret = scene
    evil = tmp_path / "evil-sr"
    evil.mkdir()
    os.link(secret, str(evil / (vdi + ".vhd")))

    def swap():
        os.rename(tree.dir, tree.dir + ".moved")
        os.symlink(str(evil), tree.dir)

    done = _swap_after_check(monkeypatch, vdi + ".vhd", swap)
    with pytest.raises(sr_mod.PathChanged) as err:
        sr_mod.FileSR([tree.root]).open_export(vdi)
    assert done
    assert tree.sr in str(err.value)


def test_other_file_renamed_over_it_after_the_check_is_refused(scene, monkeypatch):
    """Not a symlink: another regular file inside the SR renamed over the checked one. The walk
    succeeds; the fstat() identity check catches it."""
    tree, vdi, _secret = scene
    leaf = tree.path(vdi)
    other = tree.path(str(uuid.uuid4()))
    qemu_vhd(other, 2 * MiB, [(0, MiB, 0x22)])
    real_stat = os.stat
    swapped = []
    # armed by the check of the leaf; the stat() of the checked file that follows it swaps
    armed = _swap_after_check(monkeypatch, vdi + ".vhd", lambda: None)

    def stat_then_swap(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if armed and not swapped and str(path).endswith(vdi + ".vhd"):
            swapped.append(path)
            os.replace(other, leaf)
        return st

    monkeypatch.setattr(rooted.os, "stat", stat_then_swap)
    try:
        with pytest.raises(sr_mod.PathChanged) as err:
            sr_mod.FileSR([tree.root]).open_export(vdi)
    finally:
        monkeypatch.undo()
    assert swapped
    assert "another file than the one checked" in str(err.value)


def test_fifo_swapped_in_does_not_block(scene, monkeypatch):
    tree, vdi, _secret = scene
    leaf = tree.path(vdi)

    def swap():
        os.unlink(leaf)
        os.mkfifo(leaf)

    done = _swap_after_check(monkeypatch, vdi + ".vhd", swap)
    with pytest.raises(sr_mod.PathChanged):
        sr_mod.FileSR([tree.root]).open_export(vdi)  # returns: O_NONBLOCK, then not regular
    assert done


def test_plain_symlink_inside_the_roots_still_opens(scene):
    """What was allowed stays allowed: a symlink whose target is inside the roots."""
    tree, vdi, _secret = scene
    alias = str(uuid.uuid4())
    os.symlink(os.path.basename(tree.path(vdi)), tree.path(alias))
    with sr_mod.FileSR([tree.root]).open_export(alias) as export:
        assert export.read(0, MiB) == bytes([LEGIT]) * MiB


FLIPPER = r"""
import os, sys
leaf, real_copy, secret, counter = sys.argv[1:5]
n = 0
while True:
    tmp = leaf + ".tmp"
    os.symlink(secret, tmp)
    os.replace(tmp, leaf)
    os.link(real_copy, leaf + ".new")  # (renaming a hard link over itself is a no-op)
    os.replace(leaf + ".new", leaf)
    n += 1
    if n % 50 == 0:
        with open(counter, "w") as f:
            f.write(str(n))
"""


def test_racing_flipper_never_serves_the_outside_file(scene, tmp_path):
    """Another process (the SR's owner) flips the leaf between the real VHD and a symlink to the
    secret with atomic renames while exports are opened and read: every open either serves the
    VDI or is refused, never the secret."""
    tree, vdi, secret = scene
    leaf = tree.path(vdi)
    real_copy = leaf + ".real"
    os.link(leaf, real_copy)
    counter = str(tmp_path / "flips")
    proc = subprocess.Popen([sys.executable, "-c", FLIPPER, leaf, real_copy, secret, counter])
    served = refused = 0
    sr = sr_mod.FileSR([tree.root])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(counter) and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(1500):
            try:
                export = sr.open_export(vdi)
            except (sr_mod.SRError, VhdError, OSError) as exc:
                assert not isinstance(exc, PermissionError)
                refused += 1
                continue
            with export:
                data = export.read(0, 4096)
            assert data != bytes([SECRET]) * 4096, "served the file outside the roots"
            assert data == bytes([LEGIT]) * 4096
            served += 1
    finally:
        proc.kill()
        proc.wait()
    with open(counter) as f:
        flips = int(f.read() or 0)
    assert flips > 100, "the flipper barely ran: %d flips" % flips
    assert served > 0 and refused > 0, (served, refused)
