"""``fastpath mount``/``umount``/``files``: the planning code on a real partitioned image (no
root), and real mounts where this machine allows them (root, /dev/fuse, nbdfuse, loop devices).

The image: an MBR with an ext4 partition made by mkfs.ext4 -d (holding a file), an LVM-typed
partition with an LVM2 label, a swap partition and an extended partition holding a logical ext4
partition: mkfs.ext4 and the kernel's ext4 are the oracles of what we mount.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from orchestrator.repo.repository import Repository
from orchestrator.serve.mountplan import PartitionTableError, partitions, plan_mounts
from tests.repo_ops.helpers import DiskModel, backup
from tests.serve.conftest import TIMEOUT, cli_env

MiB = 1 << 20


def _entry(ptype, first, count):
    return struct.pack("<B3sB3sII", 0, b"\0" * 3, ptype, b"\0" * 3, first, count)


def _ext4(tmp_path, name, text, size_mib):
    src = tmp_path / f"{name}-src"
    src.mkdir()
    (src / "hello.txt").write_text(text)
    img = tmp_path / f"{name}.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(src), str(img), f"{size_mib}M"],
        check=True,
        timeout=TIMEOUT,
        capture_output=True,
    )
    return img.read_bytes()


@pytest.fixture
def image(tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    size = 28 * MiB + 3 * 512
    disk = bytearray(size)
    p1 = _ext4(tmp_path, "p1", "hello from p1\n", 12)
    p5 = _ext4(tmp_path, "p5", "hello from p5\n", 4)
    mbr = bytearray(512)
    mbr[446:462] = _entry(0x83, 2048, len(p1) // 512)  # 1 MiB .. 13 MiB
    mbr[462:478] = _entry(0x8E, 13 * 2048, 2 * 2048)  # LVM, 13 .. 15 MiB
    mbr[478:494] = _entry(0x82, 15 * 2048, 2048)  # swap, 15 .. 16 MiB
    mbr[494:510] = _entry(0x05, 16 * 2048, 12 * 2048)  # extended 16 .. 28 MiB
    mbr[510:512] = b"\x55\xaa"
    disk[0:512] = mbr
    disk[MiB : MiB + len(p1)] = p1
    disk[13 * MiB + 512 : 13 * MiB + 520] = b"LABELONE"
    disk[13 * MiB + 536 : 13 * MiB + 544] = b"LVM2 001"
    disk[15 * MiB + 4086 : 15 * MiB + 4096] = b"SWAPSPACE2"
    ebr = bytearray(512)
    ebr[446:462] = _entry(0x83, 2048, len(p5) // 512)  # logical: 17 .. 21 MiB
    ebr[510:512] = b"\x55\xaa"
    disk[16 * MiB : 16 * MiB + 512] = ebr
    disk[17 * MiB : 17 * MiB + len(p5)] = p5
    return bytes(disk)


def test_plan_without_root(image):
    def read(o, n):
        return image[o : o + n]

    parts = partitions(read, len(image))
    assert [(p.number, p.offset, p.kind) for p in parts] == [
        (1, MiB, "mbr:0x83"),
        (2, 13 * MiB, "mbr:0x8e"),
        (3, 15 * MiB, "mbr:0x82"),
        (5, 17 * MiB, "mbr:0x83"),
    ]
    mounts, skipped = plan_mounts(read, len(image), "/mnt/x")
    assert [(m["partition"], m["fstype"], m["target"]) for m in mounts] == [
        ("p1", "ext4", "/mnt/x/p1"),
        ("p5", "ext4", "/mnt/x/p5"),
    ]
    assert mounts[0]["options"] == f"ro,loop,offset={MiB},sizelimit={12 * MiB},noload"
    reasons = {s["partition"]: s["reason"] for s in skipped}
    assert "device-mapper" in reasons["p2"] and reasons["p3"] == "swap"
    # a damaged table is refused, naming the partition
    bad = bytearray(image)
    bad[446 + 12 : 446 + 16] = struct.pack("<I", 10**8)
    with pytest.raises(PartitionTableError, match="partition 1"):
        partitions(lambda o, n: bytes(bad[o : o + n]), len(bad))
    # no table: the whole disk
    p1 = image[MiB : 13 * MiB]
    m, _ = plan_mounts(lambda o, n: p1[o : o + n], len(p1), "/mnt/y")
    assert [(x["partition"], x["fstype"], x["offset"]) for x in m] == [("disk", "ext4", 0)]


def _mount_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop mounts)"
    if shutil.which("nbdfuse") is None or not os.path.exists("/dev/fuse"):
        return "needs nbdfuse and /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices"
    return None


def fastpath(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(env),
    )


@pytest.fixture
def point_of_image(image, tmp_path):
    url = str(tmp_path / "repo")
    repo = Repository.init(url)
    disk = DiskModel(len(image) // (2 * MiB), tail=len(image) % (2 * MiB), seed=9)
    disk.data[:] = image
    rid, _ = backup(repo, "vm-mount", [disk])
    repo.close()
    return url, rid


def test_mount_and_umount(point_of_image, tmp_path):
    why = _mount_possible()
    if why:
        pytest.skip(why)
    url, rid = point_of_image
    target = tmp_path / "mnt"
    target.mkdir()
    r = fastpath("mount", url, rid, target, "--json")
    if r.returncode != 0 and "mount" in r.stderr and "permission denied" in r.stderr.lower():
        pytest.skip(f"this machine refuses loop mounts: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    try:
        assert (target / "p1" / "hello.txt").read_text() == "hello from p1\n"
        assert (target / "p5" / "hello.txt").read_text() == "hello from p5\n"
        with pytest.raises(OSError):
            (target / "p1" / "new.txt").write_text("no")
        assert {s["partition"] for s in state["skipped"]} == {"p2", "p3"}
        busy = fastpath("mount", url, rid, target)
        assert busy.returncode == 1 and "not empty" in busy.stderr
    finally:
        u = fastpath("umount", target, "--json")
    assert u.returncode == 0, u.stderr
    assert os.listdir(target) == []
    assert not os.path.ismount(target / "p1")
    deadline_ok = False
    for _ in range(200):  # the serve process was told to stop: poll until it is gone
        try:
            os.kill(state["serve_pid"], 0)
        except ProcessLookupError:
            deadline_ok = True
            break
        subprocess.run(["sleep", "0.05"])
    assert deadline_ok, "fastpath serve still running after umount"


def test_umount_of_something_else(tmp_path):
    r = fastpath("umount", tmp_path)
    assert r.returncode == 1 and "not a fastpath mount" in r.stderr


def test_files_needs_guestfish(point_of_image):
    url, rid = point_of_image
    r = fastpath("files", url, rid, "/")
    if shutil.which("guestfish") is None:
        assert r.returncode == 1
        assert "guestfish not found" in r.stderr and "libguestfs" in r.stderr
        pytest.skip("guestfish is not installed: only its missing-tool error was tested")
    assert r.returncode == 0, r.stderr
    assert "hello.txt" in r.stdout
