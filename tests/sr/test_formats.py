"""Image format per VDI: XCP-ng 8.3 stores some VDIs as QCOW2 (<uuid>.qcow2 on file SRs,
QCOW2-<uuid> LVs, disks over 2040 GiB). Until the agent serves QCOW2, such a VDI is refused with an
error naming the fallback transport (XAPI's NBD), through the admin API and the XAPI plugin.
The QCOW2 images are made by qemu-img."""

import json
import os
import subprocess
import uuid as uuidlib

import pytest

from agent import sr as sr_mod
from agent import tickets
from tests.plugin.test_plugin import XapiFailure, call_plugin, write_config

FALLBACK = "--transport xapi-nbd"


def qcow2(path, size="4M"):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, size], check=True, timeout=60)


def test_qcow2_file_refused(file_sr):
    vdi = str(uuidlib.uuid4())
    qcow2(os.path.join(file_sr.dir, vdi + ".qcow2"))
    sr = sr_mod.FileSR([file_sr.root])
    for sr_uuid in (file_sr.sr, None):
        with pytest.raises(sr_mod.UnsupportedFormat) as err:
            sr.open_export(vdi, sr_uuid)
        msg = str(err.value)
        assert vdi in msg and "QCOW2" in msg and FALLBACK in msg


def test_qcow2_content_behind_a_vhd_name_refused(file_sr):
    vdi = str(uuidlib.uuid4())
    qcow2(file_sr.path(vdi))
    with pytest.raises(sr_mod.UnsupportedFormat) as err:
        sr_mod.FileSR([file_sr.root]).open_export(vdi, file_sr.sr)
    assert FALLBACK in str(err.value)


def test_qcow2_parent_refused(file_sr, tmp_path):
    """A differencing VHD whose parent file turns out to be QCOW2 is refused the same way."""
    from tests.fixtures.vhd import Level

    (root, leaf), _ = file_sr.chain([Level(4 << 20), Level(4 << 20)])
    qcow2(os.path.join(file_sr.dir, "x.qcow2"))
    os.replace(os.path.join(file_sr.dir, "x.qcow2"), file_sr.path(root))
    with pytest.raises(sr_mod.UnsupportedFormat) as err:
        sr_mod.FileSR([file_sr.root]).open_export(leaf, file_sr.sr)
    assert FALLBACK in str(err.value) and file_sr.path(root) in str(err.value)


def test_admin_api_and_plugin_name_the_fallback(tmp_path, file_sr, agent_proc):
    vdi = str(uuidlib.uuid4())
    qcow2(os.path.join(file_sr.dir, vdi + ".qcow2"))
    agent = agent_proc([file_sr.root])
    resp = tickets.admin_call(agent.admin_socket, {"op": "create_ticket", "vdi": vdi}, timeout=30)
    assert not resp["ok"]
    assert FALLBACK in resp["error"] and vdi in resp["error"]
    config = write_config(tmp_path, agent.admin_socket)
    with pytest.raises(XapiFailure) as ei:
        call_plugin("open_export", {"vdi": vdi}, config)
    assert ei.value.code == "FASTPATH_OPEN_FAILED"
    assert any(FALLBACK in str(p) for p in ei.value.params), json.dumps(ei.value.params)
