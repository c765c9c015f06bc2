"""Every ``fastpath`` command pays for building the parser, which imports every command module
(they register themselves). Heavy third-party modules must therefore stay out of the modules'
top level and load only in the commands that use them (issue 17: fixed cost per command; the
time itself is measured by ``bench/startup.py``, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.repo.repository import Repository

# What no command needs before it runs: numpy (dedup lookups, GC, verify), S3 (boto3), libnbd,
# the XenAPI SDK, uvloop, prometheus_client, and the codec's cryptography and zstandard.
BANNED = (
    "numpy",
    "boto3",
    "botocore",
    "nbd",
    "XenAPI",
    "uvloop",
    "prometheus_client",
    "cryptography",
    "zstandard",
)

PROBE = """
import json, sys
banned = json.loads(sys.argv[2])
sys.argv = ["fastpath"] + json.loads(sys.argv[1])
from orchestrator import cli
{action}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in banned)))
"""


def loaded_after(action: str, argv: list[str]) -> list[str]:
    code = PROBE.format(action=action)
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argv), json.dumps(BANNED)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def tops(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules})


def test_building_the_parser_imports_no_heavy_module():
    assert tops(loaded_after("cli.build_parser()", [])) == []


def test_the_probe_sees_a_heavy_import():
    """The check above can fail: the same probe sees numpy once something imports it."""
    assert "numpy" in tops(loaded_after("cli.build_parser(); import numpy", []))


@pytest.mark.parametrize("argv", [["list"], ["show", "latest"]], ids=lambda a: a[0])
def test_reading_a_local_repository_needs_no_numpy_s3_nbd_or_xapi(tmp_path, argv):
    repo = str(tmp_path / "r")
    Repository.init(repo).close()
    cmd = [argv[0], repo, *argv[1:]]
    action = "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass"
    got = tops(loaded_after(action, cmd))
    assert not set(got) & {
        "numpy",
        "boto3",
        "botocore",
        "nbd",
        "XenAPI",
        "uvloop",
        "cryptography",
    }, got
