"""Structures and details: geometry and checksums against qemu's files, locator encodings, parent
resolution fallbacks, concurrent reads through the bitmap cache."""

import os
import random
import threading

import pytest

from agent import vhd
from agent.vhd import file as vfile
from agent.vhd import format as fmt
from tests.fixtures.vhd import Level, MiB, build_chain, pattern, run


@pytest.mark.parametrize("size", ["1M", "10M", "100M", "1G", "40G", "130G"])
def test_geometry_and_checksum_match_qemu(tmp_path, qemu_tools, size):
    """qemu computes CHS with the specification's algorithm too (and sizes its disks from it)."""
    p = str(tmp_path / "g.vhd")
    run(["qemu-img", "create", "-f", "vpc", "-o", "subformat=dynamic", p, size])
    with open(p, "rb") as f:
        f.seek(-512, 2)
        footer = fmt.Footer.parse(f.read(512))
    assert footer.checksum_ok() and footer.computed_checksum() == footer.checksum
    assert fmt.chs_geometry(footer.current_size) == (
        footer.cylinders,
        footer.heads,
        footer.sectors_per_track,
    )
    with open(p, "rb") as f:
        f.seek(footer.data_offset)
        header = fmt.Header.parse(f.read(1024))
    assert header.computed_checksum() == header.checksum
    # our encoder reproduces qemu's bytes for the fields it sets
    rebuilt = fmt.Footer.parse(footer.build())
    assert rebuilt.raw == footer.raw


def test_footer_roundtrip():
    f = fmt.Footer(
        current_size=123 * 512, original_size=5, hidden=1, saved_state=1, disk_type=fmt.DISK_DIFF
    )
    raw = f.build()
    g = fmt.Footer.parse(raw)
    assert g.checksum_ok() and g.current_size == 123 * 512 and g.hidden == 1 and g.saved_state == 1
    assert g.uuid == f.uuid and g.creator_app == b"tap\x00" and g.disk_type_name == "differencing"
    assert len(raw) == 512 and raw[:8] == b"conectix" and raw[85] == 1


def test_locator_encodings():
    assert fmt.encode_locator(fmt.PLAT_W2RU, "./p.vhd") == ".\\p.vhd".encode("utf-16-le")
    assert fmt.encode_locator(fmt.PLAT_W2KU, "p.vhd") == ".\\p.vhd".encode("utf-16-le")
    assert fmt.encode_locator(fmt.PLAT_MACX, "/sr/p.vhd") == b"file:///sr/p.vhd"
    assert fmt.decode_locator(fmt.PLAT_W2RU, ".\\p.vhd".encode("utf-16-le")) == "./p.vhd"
    assert (
        fmt.decode_locator(fmt.PLAT_W2KU, "C:\\sr\\dir\\p.vhd".encode("utf-16-le") + b"\x00\x00")
        == "/sr/dir/p.vhd"
    )
    assert fmt.decode_locator(fmt.PLAT_MACX, b"file://localhost/sr/a%20b.vhd\x00") == "/sr/a b.vhd"
    assert fmt.decode_locator(fmt.PLAT_MACX, b"file://./p.vhd") == "./p.vhd"
    assert fmt.decode_locator(fmt.PLAT_MAC, b"alias blob") is None
    with pytest.raises(ValueError):
        fmt.decode_locator(fmt.PLAT_MACX, b"http://x/p.vhd")
    loc = fmt.ParentLocator(fmt.PLAT_W2KU, 1, 10, 0)
    assert loc.space_bytes() == 512  # sectors, per the specification
    assert (
        fmt.ParentLocator(fmt.PLAT_W2KU, 1024, 10, 0).space_bytes() == 1024
    )  # bytes, as blktap writes


def test_parent_unicode_name():
    h = fmt.Header(parent_name_raw=fmt.Header.encode_parent_name("3f1e-\u00e9.vhd"))
    assert fmt.Header.parse(h.build()).parent_name == "3f1e-\u00e9.vhd"


def _rewrite_locators(path, mapping):
    """Replace locator payloads in place: mapping {code: new path} (payload must fit its space)."""
    with open(path, "rb") as f:
        f.seek(512)
        h = fmt.Header.parse(f.read(1024))
    with open(path, "r+b") as f:
        for loc in h.locators:
            if loc.code in mapping:
                payload = fmt.encode_locator(loc.code, mapping[loc.code])
                f.seek(loc.data_offset)
                f.write(payload + bytes(loc.space_bytes() - len(payload)))
                loc.data_length = len(payload)
        f.seek(512)
        f.write(h.build())


def test_absolute_locator_when_relative_is_stale(tmp_path):
    paths, models = build_chain(tmp_path, [Level(2 * MiB, [(0, b"r" * 512)]), Level(2 * MiB)])
    _rewrite_locators(paths[1], {fmt.PLAT_W2RU: "./gone.vhd", fmt.PLAT_W2KU: "./gone.vhd"})
    with vhd.open_chain(paths[1]) as c:  # MacX (absolute) still points at the parent
        assert c.depth == 2 and c.read(0, 512) == b"r" * 512


def test_parent_name_fallback(tmp_path):
    """XCP-ng file SRs: the parent's unicode name is <uuid>.vhd beside the child."""
    paths, _ = build_chain(tmp_path, [Level(2 * MiB, [(0, b"r" * 512)]), Level(2 * MiB)])
    _rewrite_locators(
        paths[1],
        {fmt.PLAT_W2RU: "./x.vhd", fmt.PLAT_W2KU: "./x.vhd", fmt.PLAT_MACX: "/nowhere/x.vhd"},
    )
    with vhd.open_chain(paths[1]) as c:
        assert c.depth == 2 and c.files[1].path.endswith("level0.vhd")


def test_concurrent_reads_through_a_small_bitmap_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(vfile, "BITMAP_CACHE_ENTRIES", 2)
    rng = random.Random(3)
    levels = []
    for d in range(3):
        writes = [
            (rng.randrange(0, 16 * MiB - 9000), pattern(100 * d + k, rng.randrange(1, 9000)))
            for k in range(40)
        ]
        levels.append(Level(16 * MiB, writes, block_size=512 * 1024))
    paths, models = build_chain(tmp_path, levels)
    model = bytes(models[-1])
    errors = []
    with vhd.open_chain(paths[-1]) as c:

        def worker(seed):
            r = random.Random(seed)
            try:
                for _ in range(150):
                    off = r.randrange(0, c.size - 1)
                    ln = r.randrange(1, min(200000, c.size - off))
                    if c.read(off, ln) != model[off : off + ln]:
                        errors.append((off, ln))
                    i = r.randrange(c.block_count)
                    if c.read_block(i) != model[i * c.block_size : (i + 1) * c.block_size]:
                        errors.append(("block", i))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert errors == []


def test_writer_rejects_bad_arguments(tmp_path):
    p = str(tmp_path / "x.vhd")
    for size, bs in ((0, 2 * MiB), (1000, 2 * MiB), (2041 << 30, 2 * MiB), (MiB, 3000), (MiB, 256)):
        with pytest.raises(ValueError):
            vhd.create_dynamic(p, size, block_size=bs)
    with vhd.create_dynamic(p, MiB) as w:
        with pytest.raises(ValueError):
            w.write(MiB - 1, b"ab")
        w.write(MiB - 1, b"a")
    with vhd.open_chain(p) as c:
        assert c.read(MiB - 2, 2) == b"\x00a"
    assert not os.path.exists(str(tmp_path / "y.vhd"))
