"""Guest activity: what a VM writes into its disks (through the SR, so CBT sees it like tapdisk's writes).

Patterns:
- text: log/config-like lines (compresses well)
- binary: structured records, tables and code-like bytes (compresses somewhat)
- random: incompressible bytes (media, encrypted files)
- zeros: zero runs (freed space, preallocated files)
- copy: ranges copied from another disk at the same offsets (files shared by VMs of one template)
- mixed: a bit of everything
Offsets are 4 KiB aligned (a filesystem's block size), so every write covers whole 8-sector runs.
"""

import random
import struct

PAGE = 4096
PATTERNS = ("text", "binary", "random", "zeros", "copy", "mixed")

_WORDS = (
    "the of and to in is for on that with as at by from kernel systemd service started stopped "
    "user root session error warning info debug request response GET POST /var/log /usr/lib "
    "config value true false enabled disabled timeout connection backup snapshot disk block "
    "network interface eth0 address 10.0.0.1 port 443 http https python library module package"
).split()


def text_bytes(rng, n):
    out = bytearray()
    line = 0
    while len(out) < n:
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 14)))
        out += b"2026-11-27T%02d:%02d:%02d host[%d]: %s\n" % (
            line // 3600 % 24,
            line // 60 % 60,
            line % 60,
            rng.randrange(100, 5000),
            words.encode(),
        )
        line += 1
    return bytes(out[:n])


def binary_bytes(rng, n):
    out = bytearray()
    base = rng.randrange(1 << 32)
    while len(out) < n:
        kind = rng.randrange(3)
        if kind == 0:  # a table of records
            for i in range(64):
                out += struct.pack(
                    "<IIQ16s", base + i, i * 7, (base * i) & 0xFFFFFFFFFFFF, b"name%06d" % i
                )
        elif kind == 1:  # code-like: repeating opcodes with varying operands
            for _ in range(256):
                out += bytes((0x48, 0x89, rng.randrange(256), 0xE8)) + struct.pack(
                    "<i", rng.randrange(-(1 << 20), 1 << 20)
                )
        else:  # padding and alignment zeros
            out += bytes(rng.randrange(64, 1024))
    return bytes(out[:n])


def random_bytes(rng, n):
    return rng.randbytes(n)


def data_for(pattern, rng, n):
    if pattern == "text":
        return text_bytes(rng, n)
    if pattern == "binary":
        return binary_bytes(rng, n)
    if pattern == "random":
        return random_bytes(rng, n)
    if pattern == "zeros":
        return bytes(n)
    if pattern == "mixed":
        return data_for(rng.choice(("text", "text", "binary", "binary", "random", "zeros")), rng, n)
    raise ValueError("unknown pattern %r (one of %s)" % (pattern, ", ".join(PATTERNS)))


def plan(size, count, length, seed, region=None):
    """count (offset, length) pairs, 4 KiB aligned, inside [region) or the whole disk."""
    rng = random.Random(seed)
    start, end = region or (0, size)
    length = max(PAGE, (length + PAGE - 1) // PAGE * PAGE)
    out = []
    for _ in range(count):
        ln = min(length, end - start)
        off = start + rng.randrange(0, max(1, (end - start - ln) // PAGE + 1)) * PAGE
        out.append((off, ln))
    return out


def guest_write(
    pool, vdi, pattern="mixed", count=16, length=64 << 10, seed=0, source_vdi=None, region=None
):
    """Make writes into a VDI (a VM's disk). Returns [(offset, length)] written."""
    api = pool.api
    size = api.store.field("VDI", vdi, "virtual_size")
    rng = random.Random(seed ^ 0x5EED)
    writes = plan(size, count, length, seed, region)
    src_uuid = api.store.field("VDI", source_vdi, "uuid") if source_vdi else None
    for off, ln in writes:
        if pattern == "copy":
            if src_uuid is None:
                raise ValueError("pattern 'copy' needs a source disk")
            data = api._vdi_backend(source_vdi).read(src_uuid, off, ln)
        else:
            data = data_for(pattern, rng, ln)
        pool.guest_write(vdi, off, data)
    api.refresh_vdi(vdi)
    return writes


def fill_template(pool, vdi, seed=0, fraction=0.6):
    """An installed-OS-like disk: the first `fraction` of the disk written in 64 KiB pieces of text,
    binaries, zeros and some incompressible data, with holes (never-written blocks) between."""
    api = pool.api
    size = api.store.field("VDI", vdi, "virtual_size")
    rng = random.Random(seed)
    piece = 64 << 10
    end = int(size * fraction) // piece * piece
    off = 0
    while off < end:
        roll = rng.random()
        if roll < 0.15:
            off += piece * rng.randrange(1, 8)  # a hole
            continue
        kind = (
            "text"
            if roll < 0.45
            else "binary"
            if roll < 0.8
            else "random"
            if roll < 0.9
            else "zeros"
        )
        ln = min(piece * rng.randrange(1, 5), end - off)
        if ln <= 0:
            break
        pool.guest_write(vdi, off, data_for(kind, rng, ln))
        off += ln
    api.refresh_vdi(vdi)
