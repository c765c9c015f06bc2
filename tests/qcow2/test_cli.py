"""`fastpath-agent info|map|export` on QCOW2 chains (told from VHD by content), through a
subprocess: output checked against qemu-img (map, convert, compare), exit codes, one-line errors."""

import json
import os
import struct
import subprocess
import sys

from tests.qcow2.helpers import (
    MiB,
    create,
    patch,
    qemu_blocks_above,
    qemu_raw,
    qemu_zero_runs,
    run,
    sm_chain,
)

CLI = [sys.executable, "-m", "agent.cli"]


def cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, timeout=120)


def test_info(tmp_path, qemu_tools):
    paths = sm_chain(tmp_path, 6 * MiB, 3, seed=31)
    res = cli("info", paths[-1], "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "qcow2" and info["depth"] == 3 and info["size"] == 6 * MiB
    assert [f["path"] for f in info["files"]] == [os.path.abspath(p) for p in reversed(paths)]
    assert [f["backing_file"] for f in info["files"]] == [
        os.path.basename(paths[1]),
        os.path.basename(paths[0]),
        None,
    ]
    qemu = json.loads(run(["qemu-img", "info", "--output=json", paths[-1]]).stdout)
    assert info["files"][0]["cluster_size"] == qemu["cluster-size"]
    text = cli("info", paths[-1])
    assert text.returncode == 0 and text.stdout.decode().startswith("QCOW2 chain ")


def test_map_and_changed(tmp_path, qemu_tools):
    paths = sm_chain(tmp_path, 8 * MiB, 3, seed=32)
    res = cli("map", paths[-1], "--json")
    assert res.returncode == 0, res.stderr
    runs = [(e["offset"], e["length"], e["zero"]) for e in json.loads(res.stdout)]
    assert runs == qemu_zero_runs(paths[-1])
    res = cli("map", paths[-1], "--base", paths[0], "--json")
    assert json.loads(res.stdout)["changed_blocks"] == qemu_blocks_above(paths[-1], 2)


def test_export_raw_and_vhd(tmp_path, qemu_tools):
    paths = sm_chain(tmp_path, 8 * MiB, 3, seed=33)
    out = tmp_path / "out.raw"
    assert cli("export", paths[-1], "--format", "raw", "-o", out).returncode == 0
    assert out.read_bytes() == qemu_raw(paths[-1])
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(out), paths[-1]])
    vhd = tmp_path / "out.vhd"
    assert cli("export", paths[-1], "--format", "vhd", "-o", vhd).returncode == 0
    run(["qemu-img", "compare", "-f", "vpc", "-F", "qcow2", str(vhd), paths[-1]])
    delta = tmp_path / "delta.vhd"
    res = cli("export", paths[-1], "--format", "vhd", "--base", paths[0], "-o", delta)
    assert res.returncode == 0, res.stderr


def test_errors_are_one_line(tmp_path, qemu_tools):
    p = create(tmp_path / "bad.qcow2", 4 * MiB)
    patch(p, 32, struct.pack(">I", 2))  # claims LUKS
    for cmd in (("info", p), ("map", p), ("export", p, "--format", "raw", "-o", tmp_path / "x")):
        res = cli(*cmd)
        err = res.stderr.decode()
        assert res.returncode == 1 and err.count("\n") == 1, err
        assert "bad.qcow2" in err and "crypt_method" in err and "encrypted" in err
    good = create(tmp_path / "good.qcow2", 4 * MiB)
    other = create(tmp_path / "other.qcow2", 4 * MiB)
    res = cli("map", good, "--base", other)
    assert res.returncode == 1 and "not an ancestor" in res.stderr.decode()
