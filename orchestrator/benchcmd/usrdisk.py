"""The ``--data usr`` disk of ``fastpath bench`` (and of bench/backup.py): real files, not patterns.

``build_disk`` makes a raw ext4 image with ``mkfs.ext4 -d`` from hard links (copies across file
systems) to files of /usr (text, binaries, libraries) up to about 45 % of the disk, so about half
of the 2 MiB blocks are allocated; ``install_in_pool`` writes its non-zero blocks as a dynamic VHD
with our writer (agent/vhd) and installs it as the disk of a new VM of a hostsim pool.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import uuid as uuid_mod

BS = 2 << 20
GB = 1e9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stage_files(dest: str, budget: int) -> int:
    """Hard links (copies across file systems) to files of /usr, about ``budget`` bytes."""
    total = 0
    rng = random.Random(1)
    tops = sorted(os.listdir("/usr"))
    rng.shuffle(tops)
    for top in ["share", "lib", *tops]:
        for dirpath, _dirs, files in os.walk(os.path.join("/usr", top)):
            for name in files:
                src = os.path.join(dirpath, name)
                try:
                    st = os.lstat(src)
                except OSError:
                    continue
                if not os.path.isfile(src) or os.path.islink(src) or st.st_size == 0:
                    continue
                rel = os.path.relpath(src, "/usr")
                dst = os.path.join(dest, rel)
                if os.path.exists(dst):
                    continue
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    try:
                        shutil.copyfile(src, dst)
                    except OSError:
                        continue
                total += st.st_size
                if total >= budget:
                    return total
    return total


def build_disk(work: str, size: int) -> tuple[str, int]:
    """An ext4 image (raw) filled about half with /usr files -> (raw path, allocated bytes)."""
    staging = os.path.join(work, "staging")
    raw = os.path.join(work, "disk.raw")
    staged = stage_files(staging, int(size * 0.45))
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-i",
            "4096",
            "-d",
            staging,
            raw,
            str(size // 1024) + "k",
        ],
        check=True,
    )
    shutil.rmtree(staging, ignore_errors=True)
    log(f"ext4 image: {size / GB:.2f} GB, {staged / GB:.2f} GB of files from /usr")
    return raw, staged


def install_in_pool(pool, raw: str, size: int, flat: str):
    """A VM whose disk holds the raw image's non-zero blocks (our VHD writer, SM's layout).
    ``flat`` keeps a copy of that VHD outside the SR (the copy+fdatasync baseline)."""
    from agent.vhd import create_dynamic

    vm = pool.create_vm("bench", [size])
    vdi = pool.vm_vdis(vm)[0]
    uuid = pool.api.store.field("VDI", vdi, "uuid")
    path = pool.sr.vhd_path(uuid)
    w = create_dynamic(flat, size, uuid=uuid_mod.UUID(uuid))
    allocated = 0
    with open(raw, "rb") as f:
        for off in range(0, size, BS):
            data = f.read(min(BS, size - off))
            if data.strip(b"\0"):
                w.write(off, data)
                allocated += len(data)
    w.close()
    with pool.sr.lock:
        pool.sr._drop_cache()
        shutil.copyfile(flat, path)
    pool.refresh(vdi)
    pool.api.vm__start(vm, False, False)
    return vm, vdi, uuid, path, allocated
