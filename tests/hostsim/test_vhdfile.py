"""hostsim's in-place VHD writer (guest writes, hidden flag, relink), judged by qemu-img, libvhdi and agent.vhd."""

import random
import shutil
import subprocess

import pytest

from agent import vhd
from hostsim import vhdfile

MiB = 1 << 20
PAGE = 4096


def qemu_raw(path, tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (scripts/setup-system.sh installs it)")
    out = tmp_path / "out.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(out)],
        check=True,
        timeout=60,
    )
    return out.read_bytes()


def random_writes(vf, model, seed, n=20):
    rng = random.Random(seed)
    for _ in range(n):
        off = rng.randrange(0, vf.size // PAGE) * PAGE
        ln = min(rng.randrange(1, 40) * PAGE, vf.size - off)
        data = rng.randbytes(ln)
        vf.write(off, data)
        model[off : off + ln] = data


def test_dynamic_writes_read_back_by_qemu_and_agent(tmp_path):
    size = 6 * MiB + 512 * 3  # not a block multiple
    path = tmp_path / "d.vhd"
    model = bytearray(size)
    with vhdfile.create(str(path), size) as vf:
        random_writes(vf, model, 1)
        vf.write(size - 1536, b"\xab" * 1536)  # the partial last block
        model[size - 1536 :] = b"\xab" * 1536
    with vhdfile.VhdFile(str(path), writable=True) as vf:  # reopen and keep writing
        random_writes(vf, model, 2, n=5)
    with vhd.open_chain(str(path)) as c:
        assert c.size == size
        assert c.read(0, size) == bytes(model)
    assert qemu_raw(path, tmp_path)[:size] == bytes(model)


def test_hidden_flag_and_uuid_changes_keep_the_file_valid(tmp_path):
    path = tmp_path / "h.vhd"
    with vhdfile.create(str(path), 4 * MiB) as vf:
        vf.write(0, b"x" * PAGE)
        vf.set_hidden(True)
        vf.set_uuid("11111111-2222-3333-4444-555555555555")
    with vhd.open_chain(str(path)) as c:
        leaf = c.files[0]
        assert leaf.hidden
        assert str(leaf.uuid) == "11111111-2222-3333-4444-555555555555"
    assert qemu_raw(path, tmp_path)[:PAGE] == b"x" * PAGE


def test_relink_keeps_the_child_content(tmp_path, pyvhdi_module):
    size = 4 * MiB
    a_path, b_path, child_path = tmp_path / "a.vhd", tmp_path / "b.vhd", tmp_path / "c.vhd"
    model = bytearray(size)
    with vhdfile.create(str(a_path), size) as a:
        random_writes(a, model, 3)
    shutil.copy(a_path, b_path)
    with vhdfile.VhdFile(str(b_path), writable=True) as b:
        b.set_uuid("bbbbbbbb-0000-0000-0000-000000000000")
    with vhdfile.VhdFile(str(a_path)) as a, vhdfile.create(str(child_path), size, parent=a) as c:
        random_writes(c, model, 4, n=6)
        with vhdfile.VhdFile(str(b_path)) as b:
            c.set_parent(b)
    a_path.unlink()
    with vhd.open_chain(str(child_path)) as chain:
        assert [str(f.uuid) for f in chain.files][1] == "bbbbbbbb-0000-0000-0000-000000000000"
        assert chain.read(0, size) == bytes(model)
    child = pyvhdi_module.file()
    parent = pyvhdi_module.file()
    child.open(str(child_path))
    parent.open(str(b_path))
    try:
        assert child.get_parent_identifier() == "bbbbbbbb-0000-0000-0000-000000000000"
        child.set_parent(parent)
        assert child.read_buffer_at_offset(size, 0) == bytes(model)
    finally:
        child.close()
        parent.close()


def test_bad_writes_are_refused(tmp_path):
    with vhdfile.create(str(tmp_path / "x.vhd"), MiB) as vf:
        with pytest.raises(vhdfile.VhdFileError):
            vf.write(100, b"x" * 512)
        with pytest.raises(vhdfile.VhdFileError):
            vf.write(MiB - 512, b"x" * 1024)
    with vhdfile.VhdFile(str(tmp_path / "x.vhd")) as ro, pytest.raises(vhdfile.VhdFileError):
        ro.write(0, b"x" * 512)
    (tmp_path / "junk.vhd").write_bytes(b"\0" * 4096)
    with pytest.raises(vhdfile.VhdFileError):
        vhdfile.VhdFile(str(tmp_path / "junk.vhd"))
