"""`fastpath-agent info|map|export` through a subprocess: output, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.vhd import Level, MiB, build_chain, pattern, qemu_raw

CLI = [sys.executable, "-m", "agent.cli"]


def cli(*args, stdout=subprocess.PIPE):
    return subprocess.run(
        CLI + [str(a) for a in args], stdout=stdout, stderr=subprocess.PIPE, timeout=60
    )


@pytest.fixture
def chain3(tmp_path):
    levels = [
        Level(6 * MiB, [(0, pattern(1, 2 * MiB)), (4 * MiB, pattern(2, 4096))]),
        Level(6 * MiB, [(2 * MiB + 512, pattern(3, 1024))]),
        Level(6 * MiB, [(5 * MiB, pattern(4, 8192))]),
    ]
    return build_chain(tmp_path, levels)


def test_info_json(chain3):
    paths, _ = chain3
    res = cli("info", paths[2], "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["size"] == 6 * MiB and info["depth"] == 3 and info["block_size"] == 2 * MiB
    assert [f["path"] for f in info["files"]] == paths[::-1]
    assert info["files"][0]["parent_uuid"] == info["files"][1]["uuid"]
    assert [f["allocated_blocks"] for f in info["files"]] == [1, 1, 2]
    assert all(f["hidden"] is False for f in info["files"])


def test_info_text(chain3):
    paths, _ = chain3
    res = cli("info", paths[2])
    assert res.returncode == 0
    out = res.stdout.decode()
    assert "depth 3" in out and "differencing" in out and "dynamic" in out


def test_map_extents_and_changed(chain3):
    paths, _ = chain3
    res = cli("map", paths[2], "--json")
    assert res.returncode == 0, res.stderr
    ext = json.loads(res.stdout)
    assert ext[:3] == [
        {"offset": 0, "length": 2 * MiB, "zero": False},
        {"offset": 2 * MiB, "length": 512, "zero": True},
        {"offset": 2 * MiB + 512, "length": 1024, "zero": False},
    ]
    assert sum(e["length"] for e in ext) == 6 * MiB
    res = cli("map", paths[2], "--base", paths[0], "--json")
    assert json.loads(res.stdout)["changed_blocks"] == [1, 2]
    res = cli("map", paths[0], "--base", paths[2])
    assert res.returncode == 1
    assert res.stderr.decode().count("\n") == 1 and "not an ancestor" in res.stderr.decode()


def test_export_raw_file_and_stdout(chain3, tmp_path):
    paths, models = chain3
    out = tmp_path / "out.raw"
    res = cli("export", paths[2], "--format", "raw", "-o", out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == bytes(models[2])
    assert out.stat().st_blocks * 512 < 4 * MiB  # sparse: the zero blocks were not written
    res = cli("export", paths[2], "--format", "raw", "-o", "-")
    assert res.returncode == 0 and res.stdout == bytes(models[2])


def test_export_vhd_full_and_incremental(chain3, tmp_path, qemu_tools):
    paths, models = chain3
    full = tmp_path / "full.vhd"
    res = cli("export", paths[2], "--format", "vhd", "-o", full)
    assert res.returncode == 0, res.stderr
    assert qemu_raw(full, tmp_path) == bytes(models[2])
    # incremental: a differencing VHD whose parent is the base's leaf, next to it
    incr = os.path.join(os.path.dirname(paths[0]), "incr.vhd")
    with open(incr, "wb") as f:
        res = cli("export", paths[2], "--format", "vhd", "--base", paths[0], "-o", "-", stdout=f)
    assert res.returncode == 0, res.stderr
    res = cli("export", incr, "--format", "raw", "-o", "-")
    assert res.returncode == 0 and res.stdout == bytes(models[2])


def test_usage_errors(chain3):
    paths, _ = chain3
    assert cli().returncode == 2
    assert cli("info").returncode == 2
    assert cli("export", paths[2], "--format", "qcow2", "-o", "x").returncode == 2
    res = cli("export", paths[2], "--format", "raw", "--base", paths[0], "-o", "x")
    assert res.returncode == 2 and "--base" in res.stderr.decode()


def test_operational_errors_are_one_line(tmp_path):
    res = cli("info", tmp_path / "missing.vhd")
    assert res.returncode == 1 and res.stderr.decode().count("\n") == 1
    bad = tmp_path / "bad.vhd"
    bad.write_bytes(b"conectix" + bytes(600))
    res = cli("info", bad)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "bad.vhd" in err and "footer" in err
