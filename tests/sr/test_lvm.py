"""LVM SRs (VG_XenStorage-<sr>, VHD-<uuid> / LV-<uuid> volumes) without LVM.

These build machines have loop devices but no device-mapper: real LVs cannot be created or
activated here. Each "LV" is therefore a loop device (losetup, read-only) over a file that holds a
VHD followed by zero padding (the LV is larger than the VHD; the footer is in the VHD's last 512
bytes, not the device's), and `lvs`/`lvchange` are a recording stand-in: the injectable runner of
agent.lvm (and, for the daemon, two scripts given as [lvm] lvs/lvchange). "Activation" creates the
device node <dev_dir>/<vg>/<lv> (a symlink to the loop device), as LVM would. When losetup is not
permitted (not root), the symlinks point at the plain files instead, and the tests say so in their
skip-free output (LOOP_REASON); the code path is the same except S_ISBLK.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid as uuidlib

import pytest

from agent import lvm as lvm_mod
from agent import sr as sr_mod
from agent import vhd
from tests.fixtures.vhd import Level, build_chain, pattern, qemu_raw
from tests.sr.conftest import KiB, MiB

PAD = 4 * MiB + 3 * 512  # LVs are rounded up to extents: never the VHD's exact size


def _losetup_ok():
    if os.geteuid() != 0 or not shutil.which("losetup"):
        return False
    try:
        subprocess.run(["losetup", "-f"], check=True, capture_output=True, timeout=10)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


USE_LOOP = _losetup_ok()
LOOP_REASON = (
    "loop devices stand in for the LVs"
    if USE_LOOP
    else "losetup is not permitted here (not root): plain files stand in for the LVs"
)


class FakeVG(object):
    """A volume group of 'LVs' (loop devices or files) and a recording lvs/lvchange runner."""

    def __init__(self, tmp_path, sr_uuid=None):
        self.tmp = tmp_path
        self.sr_uuid = sr_uuid or str(uuidlib.uuid4())
        self.vg = "VG_XenStorage-" + self.sr_uuid
        self.dev_dir = str(tmp_path / "dev")
        self.store = tmp_path / "lvstore"
        self.store.mkdir(exist_ok=True)
        os.makedirs(os.path.join(self.dev_dir, self.vg), exist_ok=True)
        self.lvs = {}  # name -> {"backing": path, "size": int, "active": bool}
        self.loops = []
        self.calls = []
        self.busy = set()  # LVs whose deactivation fails ("in use")

    def add(self, name, image_path, active=False, pad=PAD, writable=False):
        """Copy an image into a padded backing file and register it as LV `name`."""
        backing = str(self.store / name)
        shutil.copyfile(image_path, backing)
        with open(backing, "r+b") as f:
            f.seek(0, os.SEEK_END)
            f.write(bytes(pad))
        dev = backing
        if USE_LOOP:
            out = subprocess.run(
                ["losetup", "-f", "--show"] + ([] if writable else ["--read-only"]) + [backing],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
            dev = out.stdout.strip()
            self.loops.append(dev)
        self.lvs[name] = {"backing": dev, "size": os.path.getsize(backing), "active": False}
        if active:
            self._activate(name)
        return dev

    def node(self, name):
        return os.path.join(self.dev_dir, self.vg, name)

    def _activate(self, name):
        lv = self.lvs[name]
        if not os.path.lexists(self.node(name)):
            os.symlink(lv["backing"], self.node(name))
        lv["active"] = True

    def runner(self, argv, timeout):
        self.calls.append(list(argv))
        cmd = os.path.basename(argv[0])
        if cmd == "lvs":
            vg = argv[-1] if argv[-1].startswith("VG_") else None
            if vg is not None and vg != self.vg:
                return 5, "", '  Volume group "%s" not found\n' % vg
            lines = []
            for name, lv in sorted(self.lvs.items()):
                attr = "-wi-a-----" if lv["active"] else "-wi-------"
                lines.append("  %s|%s|%d|%s" % (self.vg, name, lv["size"], attr))
            return 0, "\n".join(lines) + "\n", ""
        if cmd == "lvchange":
            vg, name = argv[-1].split("/")
            assert vg == self.vg and name in self.lvs, argv
            if argv[1] == "-ay":
                self._activate(name)
                return 0, "", ""
            if argv[1] == "-an":
                if name in self.busy:
                    return 5, "", "  Logical volume %s/%s in use.\n" % (vg, name)
                os.unlink(self.node(name))
                self.lvs[name]["active"] = False
                return 0, "", ""
        return 3, "", "unexpected command %r" % argv

    def changes(self):
        return [c[1:] for c in self.calls if os.path.basename(c[0]) == "lvchange"]

    def close(self):
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
        self.loops = []


@pytest.fixture
def fake_vg(tmp_path):
    vgs = []

    def make(sr_uuid=None):
        v = FakeVG(tmp_path, sr_uuid)
        vgs.append(v)
        return v

    yield make
    for v in vgs:
        v.close()


def lvm_sr(vg, **kw):
    return sr_mod.LVMSR(lvm_mod.LVM(runner=vg.runner, dev_dir=vg.dev_dir), **kw)


def _lv_chain(tmp_path, vg, raw_root=False, active=()):
    """A 3-level chain as LVs: root (raw LV- or VHD-), middle VHD-, leaf VHD-. Returns (uuids root
    first, models root first)."""
    work = tmp_path / ("work-%s" % uuidlib.uuid4().hex[:6])
    work.mkdir()
    size = 6 * MiB
    ids = [str(uuidlib.uuid4()) for _ in range(3)]
    names = [("LV-" if raw_root else "VHD-") + ids[0], "VHD-" + ids[1], "VHD-" + ids[2]]
    levels = [
        Level(size, [(0, pattern(1, 3 * MiB)), (4 * MiB, pattern(2, MiB))], raw=raw_root),
        Level(size, [(MiB + 4 * KiB, pattern(3, 2 * MiB)), (5 * MiB, pattern(4, 64 * KiB))]),
        Level(size, [(2 * MiB, pattern(5, 2 * MiB)), (16 * KiB, pattern(6, 8 * KiB))]),
    ]
    for lv, name in zip(levels, names):
        lv.name = name
    paths, models = build_chain(str(work), levels)
    # the LV names carry the footer uuids (VHD-<uuid>): read them back from the files
    real = []
    for p, name in zip(paths, names):
        if name.startswith("LV-"):
            real.append(name[3:])
        else:
            with vhd.VhdFile.open(p) as f:
                real.append(str(f.uuid))
    final = []
    for p, name, u in zip(paths, names, real):
        lvname = name.split("-", 1)[0] + "-" + u
        vg.add(lvname, p, active=lvname in active or name in active)
        final.append(u)
    return final, models, paths


def test_vhd_inside_a_larger_lv(tmp_path, fake_vg):
    """A dynamic VHD (qemu-img wrote it) inside a padded device: read equals qemu-img's decoding,
    and the VHD's end is found (physical end computed from the metadata, footer there)."""
    vg = fake_vg()
    src = str(tmp_path / "src.vhd")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", src, "8M"],
        check=True,
        timeout=60,
    )
    subprocess.run(
        ["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x33 6M 64k", src],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with vhd.VhdFile.open(src) as f:
        vdi = str(f.uuid)
    vg.add("VHD-" + vdi, src)
    sr = lvm_sr(vg)
    with sr.open_export(vdi, vg.sr_uuid) as exp:
        leaf = exp.chain.files[0]
        assert leaf.end == os.path.getsize(src), (LOOP_REASON, leaf.end)
        assert exp.read(0, exp.size) == qemu_raw(src, tmp_path)[: exp.size]
        assert vg.changes() == [["-ay", "%s/VHD-%s" % (vg.vg, vdi)]]
    assert vg.changes()[-1] == ["-an", "%s/VHD-%s" % (vg.vg, vdi)]
    assert not vg.lvs["VHD-" + vdi]["active"]


@pytest.mark.parametrize("raw_root", [False, True], ids=["vhd-root", "raw-root"])
def test_chain_of_lvs(tmp_path, fake_vg, raw_root):
    """VHD-leaf -> VHD- -> VHD-/LV- root, parents found by uuid in the VG (never by locator path);
    only inactive LVs are activated, and only those are deactivated afterwards."""
    vg = fake_vg()
    ids, models, _paths = _lv_chain(tmp_path, vg, raw_root=raw_root)
    root_name = ("LV-" if raw_root else "VHD-") + ids[0]
    vg._activate("VHD-" + ids[1])  # already active (a VM uses it): must stay active
    sr = lvm_sr(vg)
    exp = sr.open_export(ids[2], None)  # SR found by searching the VGs
    try:
        assert [f.kind for f in exp.chain.files] == ["vhd", "vhd", "raw" if raw_root else "vhd"]
        assert exp.read(0, exp.size) == bytes(models[2])
        assert sorted(c[1] for c in vg.changes()) == sorted(
            ["%s/VHD-%s" % (vg.vg, ids[2]), "%s/%s" % (vg.vg, root_name)]
        )
        # a second export of the same chain shares the activations
        with sr.open_export(ids[2], vg.sr_uuid) as exp2:
            assert exp2.read(MiB, MiB) == bytes(models[2][MiB : 2 * MiB])
        assert all(lv["active"] for lv in vg.lvs.values())
        assert sr.lvm.users(vg.vg, root_name) == 1
    finally:
        exp.close()
    assert [c[0] for c in vg.changes()].count("-an") == 2
    assert vg.lvs["VHD-" + ids[1]]["active"], "an LV we did not activate was deactivated"
    assert not vg.lvs["VHD-" + ids[2]]["active"] and not vg.lvs[root_name]["active"]
    assert sr.lvm.users(vg.vg, root_name) == 0


def test_raw_vdi(tmp_path, fake_vg):
    vg = fake_vg()
    vdi = str(uuidlib.uuid4())
    img = tmp_path / "raw.img"
    data = pattern(9, 3 * MiB)
    img.write_bytes(data)
    vg.add("LV-" + vdi, str(img), pad=MiB)
    with lvm_sr(vg).open_export(vdi, vg.sr_uuid) as exp:
        assert exp.size == 4 * MiB  # a raw VDI is its whole LV
        assert exp.read(0, 3 * MiB) == data
        assert exp.read(3 * MiB, MiB) == bytes(MiB)


def test_deactivation_refused_while_in_use(tmp_path, fake_vg):
    """tapdisk opened the LV meanwhile: lvchange -an fails, the LV stays active, close succeeds."""
    vg = fake_vg()
    ids, models, _ = _lv_chain(tmp_path, vg)
    vg.busy.add("VHD-" + ids[2])
    exp = lvm_sr(vg).open_export(ids[2], vg.sr_uuid)
    exp.close()
    assert vg.lvs["VHD-" + ids[2]]["active"]
    assert not vg.lvs["VHD-" + ids[0]]["active"]


def test_missing_parent_and_failed_open_release_activations(tmp_path, fake_vg):
    vg = fake_vg()
    ids, _models, _ = _lv_chain(tmp_path, vg)
    del vg.lvs["VHD-" + ids[1]]  # the middle LV is gone
    sr = lvm_sr(vg)
    with pytest.raises(vhd.ChainError) as err:
        sr.open_export(ids[2], vg.sr_uuid)
    assert "VHD-" + ids[1] in str(err.value)
    assert not any(lv["active"] for lv in vg.lvs.values())
    assert sr.lvm.users(vg.vg, "VHD-" + ids[2]) == 0


def test_not_found_and_misnamed_refused(tmp_path, fake_vg):
    """QCOW2-<uuid> LVs are served (tests/qcow2/test_sr.py); one whose content is not QCOW2, or a
    VHD-<uuid> holding QCOW2, is refused with the fallback named."""
    vg = fake_vg()
    sr = lvm_sr(vg)
    with pytest.raises(sr_mod.VDINotFound):
        sr.open_export(str(uuidlib.uuid4()), vg.sr_uuid)
    q = str(uuidlib.uuid4())
    img = tmp_path / "q.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True, timeout=60
    )
    vg.add("VHD-" + q, str(img))
    with pytest.raises(sr_mod.UnsupportedFormat) as err:
        sr.open_export(q, vg.sr_uuid)
    assert "--transport xapi-nbd" in str(err.value) and q in str(err.value)
    v = str(uuidlib.uuid4())
    src = str(tmp_path / "v.vhd")
    vhd.create_dynamic(src, 4 * MiB).close()
    vg.add("QCOW2-" + v, src)
    with pytest.raises(sr_mod.UnsupportedFormat) as err:
        sr.open_export(v, vg.sr_uuid)
    assert "--transport xapi-nbd" in str(err.value) and "no QCOW2 magic" in str(err.value)
    assert all(sr.lvm.users(vg.vg, n) == 0 for n in vg.lvs)  # activations released


def test_guard_sees_the_vhd_grow_inside_the_lv(tmp_path, fake_vg):
    """On a block device mtime says nothing: the guard re-reads the VHD's footer (and header).
    vhd-util growing the VHD inside its LV (a coalesce into it) writes block data where the old
    footer was: the export must fail from then on."""
    from agent.export import ChainChanged

    vg = fake_vg()
    src = str(tmp_path / "grow.vhd")
    with vhd.create_dynamic(src, 4 * MiB) as w:
        w.write(0, pattern(11, MiB))
        vdi = str(w.uuid)
    dev = vg.add("VHD-" + vdi, src, writable=True)
    exp = lvm_sr(vg).open_export(vdi, vg.sr_uuid)
    try:
        assert exp.read(0, MiB) == pattern(11, MiB)
        footer_at = exp.chain.files[0].end - 512
        assert footer_at == os.path.getsize(src) - 512
        fd = os.open(dev, os.O_RDWR)
        try:
            os.pwrite(fd, pattern(12, 512), footer_at)
            os.fsync(fd)
        finally:
            os.close(fd)
        with pytest.raises(ChainChanged) as err:
            exp.read(0, 4096)
        assert ("offset %d" % footer_at) in str(err.value) or "modified" in str(err.value)
    finally:
        exp.close()


# --- the daemon with recording lvs/lvchange scripts --------------------------------------------

FAKE_LVM = r"""#!%(python)s
import json, os, sys
state_path = %(state)r
with open(state_path) as f:
    st = json.load(f)
with open(st["log"], "a") as f:
    f.write(json.dumps(sys.argv) + "\n")
cmd = os.path.basename(sys.argv[0])
if cmd.endswith("lvs"):
    for name, lv in sorted(st["lvs"].items()):
        print("  %%s|%%s|%%d|%%s" %% (st["vg"], name, lv["size"], "-wi-a-----" if lv["active"] else "-wi-------"))
    sys.exit(0)
vg, name = sys.argv[-1].split("/")
node = os.path.join(st["dev_dir"], vg, name)
if sys.argv[1] == "-ay":
    if not os.path.lexists(node):
        os.symlink(st["lvs"][name]["backing"], node)
    st["lvs"][name]["active"] = True
else:
    os.unlink(node)
    st["lvs"][name]["active"] = False
with open(state_path + ".tmp", "w") as f:
    json.dump(st, f)
os.rename(state_path + ".tmp", state_path)
"""


def test_daemon_serves_lvm_chain_over_nbd(tmp_path, fake_vg, agent_proc):
    import nbd

    vg = fake_vg()
    ids, models, _ = _lv_chain(tmp_path, vg, raw_root=True)
    state = tmp_path / "lvm-state.json"
    log = tmp_path / "lvm-calls.log"
    state.write_text(
        json.dumps({"vg": vg.vg, "lvs": vg.lvs, "dev_dir": vg.dev_dir, "log": str(log)})
    )
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("lvs", "lvchange"):
        p = bindir / name
        p.write_text(FAKE_LVM % {"python": sys.executable, "state": str(state)})
        p.chmod(0o755)
    conf = tmp_path / "agent.conf"
    conf.write_text(
        "[agent]\nsm_lock_dir =\n[lvm]\nenabled = yes\nlvs = %s\nlvchange = %s\ndev_dir = %s\n"
        % (bindir / "lvs", bindir / "lvchange", vg.dev_dir)
    )
    empty_root = tmp_path / "no-file-srs"
    empty_root.mkdir()
    agent = agent_proc([empty_root], extra=["--config", str(conf)])
    tid = agent.ticket(ids[2], sr=vg.sr_uuid)
    h = nbd.NBD()
    h.connect_uri(agent.uri(tid))
    try:
        assert h.get_size() == len(models[2])
        assert h.pread(len(models[2]), 0) == bytes(models[2])
    finally:
        h.shutdown()
        h = None
    assert agent.wait_idle()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    changes = [c[1:] for c in calls if c[0].endswith("lvchange")]
    ups = sorted(c[1] for c in changes if c[0] == "-ay")
    downs = sorted(c[1] for c in changes if c[0] == "-an")
    assert ups and ups == downs, (LOOP_REASON, changes)
    final = json.loads(state.read_text())
    assert not any(lv["active"] for lv in final["lvs"].values())


# --- agent.lvm on its own -------------------------------------------------------------------------


def _canned(rc, out, err=""):
    calls = []

    def runner(argv, timeout):
        calls.append((argv, timeout))
        return rc, out, err

    return runner, calls


def test_lvs_parsing_and_command_line():
    sr = str(uuidlib.uuid4())
    out = (
        "  VG_XenStorage-%s|VHD-a|8392704|-wi-a-----\n"
        "  VG_XenStorage-%s|LV-b|4194304.00|-wi-------\n"
        "  other_vg|root|100|-wi-ao----\n\n" % (sr, sr)
    )
    runner, calls = _canned(0, out)
    vols = lvm_mod.LVM(runner=runner, dev_dir="/devz", timeout=7).list_volumes()
    assert set(vols) == {("VG_XenStorage-" + sr, "VHD-a"), ("VG_XenStorage-" + sr, "LV-b")}
    a = vols[("VG_XenStorage-" + sr, "VHD-a")]
    assert a.size == 8392704 and a.active and a.path == "/devz/VG_XenStorage-%s/VHD-a" % sr
    assert not vols[("VG_XenStorage-" + sr, "LV-b")].active
    argv, timeout = calls[0]
    assert argv[0] == "lvs" and "--noheadings" in argv and "--units" in argv and timeout == 7
    assert argv[argv.index("-o") + 1] == "vg_name,lv_name,lv_size,lv_attr"


@pytest.mark.parametrize(
    "out",
    [
        "  VG_XenStorage-x|VHD-a\n",  # too few fields
        "  VG_XenStorage-x|VHD-a|big|-wi-a-----\n",  # size not a number
        "  VG_XenStorage-x|../../etc|1|-wi-a-----\n",  # a name that would leave dev_dir
        "  VG_XenStorage-x|.hidden|1|-wi-a-----\n",
    ],
)
def test_lvs_odd_output_is_an_error(out):
    runner, _ = _canned(0, out)
    with pytest.raises(lvm_mod.LVMError):
        lvm_mod.LVM(runner=runner).list_volumes()


def test_lvs_failure_names_the_command():
    runner, _ = _canned(5, "", '  Volume group "VG_XenStorage-x" not found\n')
    with pytest.raises(lvm_mod.LVMError) as err:
        lvm_mod.LVM(runner=runner).list_volumes("VG_XenStorage-x")
    assert "lvs" in str(err.value) and "not found" in str(err.value) and "exit 5" in str(err.value)


def test_subprocess_runner_is_bounded(tmp_path):
    slow = tmp_path / "slow-lvs"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(lvm_mod.LVMError) as err:
        lvm_mod.LVM(lvs=str(slow), timeout=0.5).list_volumes()
    assert "timed out" in str(err.value)
    with pytest.raises(lvm_mod.LVMError) as err:
        lvm_mod.LVM(lvs=str(tmp_path / "missing")).list_volumes()
    assert "cannot run" in str(err.value)


def test_inflated_lv_footer_at_the_device_end(tmp_path, fake_vg):
    """SM inflates an LV before coalescing into it and writes the footer at the LV's end."""
    vg = fake_vg()
    src = str(tmp_path / "inflated.vhd")
    with vhd.create_dynamic(src, 4 * MiB) as w:
        w.write(MiB, pattern(21, MiB))
        vdi = str(w.uuid)
    vg.add("VHD-" + vdi, src, pad=0)
    with lvm_sr(vg).open_export(vdi, vg.sr_uuid) as exp:
        leaf = exp.chain.files[0]
        assert leaf.footer_at == "end" and leaf.end == os.path.getsize(src)
        assert exp.read(MiB, MiB) == pattern(21, MiB)


def test_vhd_end_not_found_falls_back_to_the_device_end(tmp_path, fake_vg):
    """No footer where the metadata says the VHD ends (only the copy at offset 0): the device's
    end stays the logical end and reads still follow the BAT."""
    vg = fake_vg()
    src = str(tmp_path / "nofooter.vhd")
    with vhd.create_dynamic(src, 4 * MiB) as w:
        w.write(0, pattern(22, 2 * MiB))
        vdi = str(w.uuid)
    with open(src, "r+b") as f:  # wipe the footer at the end: only the copy at 0 remains
        f.seek(-512, os.SEEK_END)
        f.write(bytes(512))
    vg.add("VHD-" + vdi, src)
    with lvm_sr(vg).open_export(vdi, vg.sr_uuid) as exp:
        leaf = exp.chain.files[0]
        assert leaf.footer_at == "copy" and leaf.end == os.path.getsize(src) + PAD
        assert exp.read(0, 2 * MiB) == pattern(22, 2 * MiB)
        assert exp.read(2 * MiB, 2 * MiB) == bytes(2 * MiB)
