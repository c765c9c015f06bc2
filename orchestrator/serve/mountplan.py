"""What ``fastpath mount`` mounts, decided without root and without I/O of its own.

Given ``read(offset, length) -> bytes`` over a disk, :func:`partitions` reads its partition
table (MBR, with extended/logical partitions, or GPT behind a protective MBR; no table: the
whole disk), :func:`sniff` names the filesystem at the start of each partition by its magic
(ext2/3/4, XFS, Btrfs, FAT, NTFS; LVM physical volumes and swap are recognised and skipped),
and :func:`plan_mounts` turns that into mount actions: a read-only loop mount of the partition's
byte range (``offset=``/``sizelimit=``, so no partition devices and no udev are needed) with the
options that keep a dirty journal from being replayed (ext: ``noload``, XFS: ``norecovery``).

Every field read from the disk is bounds-checked: a damaged table gives an error naming it, not
a mount of the wrong bytes.
"""

from __future__ import annotations

import struct
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass

SECTOR = 512
MAX_PARTITIONS = 128
_EXTENDED = (0x05, 0x0F, 0x85)
_LVM_GPT = "e6d6d379-f507-44c2-a23c-238f2a3df928"
_SWAP_GPT = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"


class PartitionTableError(ValueError):
    """A partition table that cannot be trusted."""


@dataclass
class Partition:
    number: int  # 1.. (0: the whole disk, no partition table)
    offset: int  # bytes
    size: int  # bytes
    kind: str  # "mbr:0x83", "gpt:<type uuid>", "disk"


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sectors) of the four primary entries (empty ones left out)."""
    out = []
    for i in range(4):
        e = sector[446 + 16 * i : 446 + 16 * (i + 1)]
        ptype = e[4]
        first, count = struct.unpack_from("<II", e, 8)
        if ptype and count:
            out.append((ptype, first, count))
    return out


def partitions(read: Callable[[int, int], bytes], disk_size: int) -> list[Partition]:
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return [Partition(0, 0, disk_size, "disk")]
    entries = _mbr_entries(mbr)
    if any(t == 0xEE for t, _, _ in entries):
        return _gpt(read, disk_size)
    if not entries and sniff(read, Partition(0, 0, disk_size, "disk")):
        return [Partition(0, 0, disk_size, "disk")]  # a FAT/NTFS boot sector, not a table
    out = []
    for n, (ptype, first, count) in enumerate(entries, 1):
        if ptype in _EXTENDED:
            out.extend(_logical(read, disk_size, first, count))
            continue
        out.append(_checked(n, first, count, f"mbr:{ptype:#04x}", disk_size))
    return out


def _checked(n: int, first: int, count: int, kind: str, disk_size: int) -> Partition:
    offset, size = first * SECTOR, count * SECTOR
    if first == 0 or offset + size > disk_size:
        raise PartitionTableError(
            f"partition {n} ({kind}) [{offset}, +{size}) is outside the {disk_size}-byte disk"
        )
    return Partition(n, offset, size, kind)


def _logical(read, disk_size: int, ext_first: int, ext_count: int) -> list[Partition]:
    out = []
    ebr_lba = ext_first
    n = 5
    seen = set()
    while True:
        if ebr_lba in seen or len(out) >= MAX_PARTITIONS:
            raise PartitionTableError(f"extended partition chain loops at sector {ebr_lba}")
        seen.add(ebr_lba)
        ebr = read(ebr_lba * SECTOR, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            raise PartitionTableError(f"extended boot record at sector {ebr_lba}: bad signature")
        entries = _mbr_entries(ebr)
        if entries and entries[0][0] not in _EXTENDED:
            ptype, first, count = entries[0]
            out.append(_checked(n, ebr_lba + first, count, f"mbr:{ptype:#04x}", disk_size))
            n += 1
        nxt = [e for e in entries[1:2] if e[0] in _EXTENDED]
        if not nxt:
            return out
        ebr_lba = ext_first + nxt[0][1]
        if ebr_lba >= ext_first + ext_count:
            raise PartitionTableError(f"extended boot record at sector {ebr_lba} is outside")


def _gpt(read, disk_size: int) -> list[Partition]:
    hdr = read(SECTOR, 92)
    if len(hdr) < 92 or hdr[:8] != b"EFI PART":
        raise PartitionTableError("protective MBR but no GPT header at sector 1")
    entries_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
    if not (128 <= esize <= 4096) or count > 4096 or entries_lba * SECTOR >= disk_size:
        raise PartitionTableError(f"GPT header: {count} entries of {esize} bytes at {entries_lba}")
    table = read(entries_lba * SECTOR, count * esize)
    out = []
    for i in range(count):
        e = table[i * esize : (i + 1) * esize]
        if len(e) < 128 or not any(e[:16]):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last < first:
            raise PartitionTableError(f"GPT partition {i + 1}: last LBA {last} < first {first}")
        kind = "gpt:" + str(uuid_mod.UUID(bytes_le=bytes(e[:16])))
        out.append(_checked(i + 1, first, last - first + 1, kind, disk_size))
        if len(out) > MAX_PARTITIONS:
            raise PartitionTableError(f"more than {MAX_PARTITIONS} GPT partitions")
    return out


def sniff(read, part: Partition) -> str | None:
    """The filesystem (or "LVM2_member", "swap") at the start of ``part``, or None."""

    def at(off: int, n: int) -> bytes:
        if off + n > part.size:
            return b""
        return read(part.offset + off, n)

    if at(0x438, 2) == b"\x53\xef":
        features = at(0x45C, 12)
        compat, incompat, _ = struct.unpack("<III", features) if len(features) == 12 else (0, 0, 0)
        if incompat & 0x40 or incompat & 0x200:  # extents / flex_bg
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"
    if at(0, 4) == b"XFSB":
        return "xfs"
    if at(0x10040, 8) == b"_BHRfS_M":
        return "btrfs"
    if at(3, 8) == b"NTFS    ":
        return "ntfs"
    if at(0x52, 5) == b"FAT32" or at(0x36, 3) == b"FAT":
        return "vfat"
    if at(512, 8) == b"LABELONE" and at(512 + 24, 8) == b"LVM2 001":
        return "LVM2_member"
    if at(4086, 10) in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    return None


MOUNT_OPTIONS = {"ext2": "", "ext3": "noload", "ext4": "noload", "xfs": "norecovery"}


def plan_mounts(read, disk_size: int, target: str) -> tuple[list[dict], list[dict]]:
    """(mounts, skipped): each mount has partition, fstype, offset, size, target dir and the
    mount options; each skipped entry has partition and reason."""
    mounts, skipped = [], []
    for p in partitions(read, disk_size):
        fstype = sniff(read, p)
        name = "disk" if p.number == 0 else f"p{p.number}"
        if p.kind == f"gpt:{_LVM_GPT}" or p.kind == "mbr:0x8e" or fstype == "LVM2_member":
            skipped.append(
                {
                    "partition": name,
                    "reason": "LVM physical volume: its logical volumes need "
                    "device-mapper (vgchange -ay on the loop device); not mounted",
                }
            )
            continue
        if fstype == "swap" or p.kind in ("mbr:0x82", f"gpt:{_SWAP_GPT}"):
            skipped.append({"partition": name, "reason": "swap"})
            continue
        if fstype is None:
            skipped.append({"partition": name, "reason": f"no filesystem recognised ({p.kind})"})
            continue
        extra = MOUNT_OPTIONS.get(fstype, "")
        options = f"ro,loop,offset={p.offset},sizelimit={p.size}" + (f",{extra}" if extra else "")
        mounts.append(
            {
                "partition": name,
                "fstype": fstype,
                "offset": p.offset,
                "size": p.size,
                "target": f"{target.rstrip('/')}/{name}",
                "options": options,
            }
        )
    return mounts, skipped
