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

    def check_then_swap(path, roots, what, within=None):
        out = real_check(path, roots, what, within)
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


# --- one SR's writer against another SR (review of the fix) -------------------------------------


@pytest.fixture
def two_srs(file_sr):
    """SR A (the attacker writes it) and SR B beside it under the same root, B holding a victim
    VDI whose data is 0x5e."""
    b_dir = os.path.join(file_sr.root, str(uuid.uuid4()))
    os.makedirs(b_dir)
    victim = str(uuid.uuid4())
    qemu_vhd(os.path.join(b_dir, victim + ".vhd"), 2 * MiB, [(0, MiB, SECRET)])
    return file_sr, b_dir, victim


def test_symlink_to_another_srs_file_is_refused(two_srs):
    a, b_dir, victim = two_srs
    mine = str(uuid.uuid4())
    os.symlink("../%s/%s.vhd" % (os.path.basename(b_dir), victim), a.path(mine))
    with pytest.raises(sr_mod.OutsideRoots, match="outside its SR directory"):
        sr_mod.FileSR([a.root]).open_export(mine, a.sr)


def test_parent_locator_into_another_sr_is_not_followed(two_srs, tmp_path):
    """A differencing VHD in A whose parent (same uuid as the locators expect) lives in B: only
    the name beside the child is tried, so B's file is never part of A's disk."""
    a, b_dir, _victim = two_srs
    vdis, _ = a.chain(
        [Level(4 * MiB, [(0, pattern(1, MiB))]), Level(4 * MiB, [(MiB, pattern(2, 512))])]
    )
    parent = a.path(vdis[0])
    os.rename(parent, os.path.join(b_dir, os.path.basename(parent)))
    with pytest.raises(VhdError, match="not found"):
        sr_mod.FileSR([a.root]).open_export(vdis[1], a.sr)


def test_vdi_in_two_srs_is_refused_without_an_sr(two_srs):
    """A file named like B's VDI in A (sorted first or not) must not shadow it."""
    a, b_dir, victim = two_srs
    qemu_vhd(a.path(victim), 2 * MiB, [(0, MiB, 0xFA)])
    sr = sr_mod.FileSR([a.root])
    with pytest.raises(sr_mod.VDIAmbiguous, match="the ticket must name its SR"):
        sr.open_export(victim)
    with sr.open_export(victim, os.path.basename(b_dir)) as export:
        assert export.read(0, 4096) == bytes([SECRET]) * 4096


def test_device_swapped_in_after_the_check_is_never_opened(scene, monkeypatch):
    """A character device (here 1:3, /dev/null's numbers) renamed over the leaf after its stat:
    refused from its O_PATH pin, never opened for reading (opening some devices has effects)."""
    import stat as stat_mod

    tree, vdi, _secret = scene
    leaf = tree.path(vdi)
    dev = leaf + ".dev"
    try:
        os.mknod(dev, stat_mod.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.fail("cannot mknod here: this test needs CAP_MKNOD (tests run as root)")
    armed = _swap_after_check(monkeypatch, vdi + ".vhd", lambda: None)
    real_stat, real_open = os.stat, os.open
    opened = []

    def stat_then_swap(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if armed and str(path).endswith(vdi + ".vhd") and os.path.exists(dev):
            os.replace(dev, leaf)
        return st

    def recording_open(path, flags, *a, **kw):
        opened.append((str(path), flags))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(rooted.os, "stat", stat_then_swap)
    monkeypatch.setattr(rooted.os, "open", recording_open)
    try:
        with pytest.raises(sr_mod.PathChanged):
            sr_mod.FileSR([tree.root]).open_export(vdi, tree.sr)
    finally:
        monkeypatch.undo()
    assert armed and not os.path.exists(dev)
    leaf_opens = [f for p, f in opened if p == os.path.basename(leaf)]
    assert leaf_opens and all(f & os.O_PATH for f in leaf_opens), opened
    assert not [p for p, _f in opened if p.startswith("/proc/self/fd/")], opened


def test_tiny_file_declaring_millions_of_blocks_is_refused(file_sr):
    """A VHD of 512-byte blocks over 1 GiB (2,097,152 blocks, a sparse 8 MiB BAT): refused
    before its BAT is read (memory at open would grow with the block count)."""
    from agent import vhd

    vdi = str(uuid.uuid4())
    with vhd.create_dynamic(file_sr.path(vdi), 1 << 30, block_size=512):
        pass
    with pytest.raises(vhd.UnsupportedVhd, match="more than the 1048576 blocks"):
        sr_mod.FileSR([file_sr.root]).open_export(vdi, file_sr.sr)
