"""XAPI's own data paths in hostsim: /export_raw_vdi, /import_raw_vdi and the xapi-nbd endpoint.

Judged by peers we did not write: qemu-img (check/convert/info of the VHD streams), libnbd (the NBD
client), agent.vhd (reading what imports wrote).
"""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import XenAPI

from agent import vhd
from hostsim import guest

MiB = 1 << 20
KiB = 1 << 10
TIMEOUT = 60


def qemu_img(*args):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (scripts/setup-system.sh installs it)")
    return subprocess.run(["qemu-img", *args], capture_output=True, timeout=TIMEOUT, check=True)


def content(pool, uuid):
    with vhd.open_chain(pool.sr.vhd_path(uuid)) as c:
        return c.read(0, c.size)


def http_get(pool, session, **query):
    q = "&".join("%s=%s" % kv for kv in {"session_id": session, **query}.items())
    with urllib.request.urlopen(pool.server.url + "export_raw_vdi?" + q, timeout=TIMEOUT) as r:
        return r.read()


def http_put(pool, session, data, **query):
    q = "&".join("%s=%s" % kv for kv in {"session_id": session, **query}.items())
    req = urllib.request.Request(pool.server.url + "import_raw_vdi?" + q, data=data, method="PUT")
    req.add_header("Content-Length", str(len(data)))
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return r.status


@pytest.fixture
def disk_vm(hostsim_pool, xapi_session):
    """A VM whose 6 MiB disk sits on a 2-deep chain with data in both levels."""
    pool, x = hostsim_pool, xapi_session.xenapi
    vm = pool.create_vm("alpha", [6 * MiB])
    vdi = pool.vm_vdis(vm)[0]
    guest.guest_write(pool, vdi, "mixed", count=10, length=128 * KiB, seed=41)
    snap = x.VDI.snapshot(vdi, {})
    guest.guest_write(
        pool, vdi, "text", count=4, length=64 * KiB, seed=42, region=(4 * MiB, 6 * MiB)
    )
    return vm, vdi, snap


def test_export_raw_is_the_decoded_chain(hostsim_pool, xapi_session, disk_vm):
    pool = hostsim_pool
    _, vdi, _ = disk_vm
    uuid = xapi_session.xenapi.VDI.get_uuid(vdi)
    raw = http_get(pool, xapi_session.handle, vdi=vdi, format="raw")
    assert raw == content(pool, uuid)
    assert http_get(pool, xapi_session.handle, vdi=uuid, format="raw") == raw  # uuid works too


def test_export_vhd_reencodes_the_raw_stream(hostsim_pool, xapi_session, disk_vm, tmp_path):
    pool = hostsim_pool
    _, vdi, snap = disk_vm
    x = xapi_session.xenapi
    uuid = x.VDI.get_uuid(vdi)
    out = tmp_path / "full.vhd"
    out.write_bytes(http_get(pool, xapi_session.handle, vdi=vdi, format="vhd"))
    info = json.loads(qemu_img("info", "--output=json", "-f", "vpc", str(out)).stdout)
    assert info["virtual-size"] == 6 * MiB
    qemu_img("convert", "-f", "vpc", "-O", "raw", str(out), str(tmp_path / "full.raw"))
    assert (tmp_path / "full.raw").read_bytes() == content(pool, uuid)

    # With base=: only the blocks of the files above the base's chain.
    delta = tmp_path / "delta.vhd"
    delta.write_bytes(http_get(pool, xapi_session.handle, vdi=vdi, format="vhd", base=snap))
    with vhd.open_chain(str(delta)) as d:
        blocks = sorted(d.allocated_blocks())
        assert blocks == sorted(pool.sr.chain(uuid)[0].allocated())
        assert blocks and all(b >= 2 for b in blocks)  # the second writes were in [4 MiB, 6 MiB)
        full = content(pool, uuid)
        for b in blocks:
            assert d.read(b * 2 * MiB, 2 * MiB) == full[b * 2 * MiB : (b + 1) * 2 * MiB]


def test_import_raw_and_vhd_round_trip(hostsim_pool, xapi_session, tmp_path):
    pool, x = hostsim_pool, xapi_session.xenapi
    size = 4 * MiB
    image = bytearray(size)
    image[0:300000] = guest.text_bytes(__import__("random").Random(1), 300000)
    image[3 * MiB : 3 * MiB + 65536] = os.urandom(65536)
    image = bytes(image)

    target = x.VDI.create(
        {"SR": pool.sr_ref, "virtual_size": str(size), "name_label": "imported", "type": "user"}
    )
    assert (
        http_put(pool, xapi_session.handle, image[:-512] + b"\0" * 512, vdi=target, format="raw")
        == 200
    )
    got = http_get(pool, xapi_session.handle, vdi=target, format="raw")
    assert got == image[:-512] + b"\0" * 512
    assert content(pool, x.VDI.get_uuid(target)) == got

    raw = tmp_path / "img.raw"
    raw.write_bytes(image)
    vpc = tmp_path / "img.vhd"
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic,force_size=on",
        str(raw),
        str(vpc),
    )
    second = x.VDI.create(
        {"SR": pool.sr_ref, "virtual_size": str(size), "name_label": "from vhd", "type": "user"}
    )
    assert http_put(pool, xapi_session.handle, vpc.read_bytes(), vdi=second, format="vhd") == 200
    assert content(pool, x.VDI.get_uuid(second)) == image
    assert int(x.VDI.get_physical_utilisation(second)) > 0


def test_data_paths_need_a_session_and_a_known_vdi(hostsim_pool, xapi_session, disk_vm):
    pool = hostsim_pool
    _, vdi, _ = disk_vm
    with pytest.raises(urllib.error.HTTPError) as err:
        http_get(pool, "OpaqueRef:bogus", vdi=vdi, format="raw")
    assert err.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as err:
        http_get(pool, xapi_session.handle, vdi="OpaqueRef:nope", format="raw")
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        http_get(pool, xapi_session.handle, vdi=vdi, format="qcow2")
    assert err.value.code == 400


def _nbd_handle(pool, tmp_path, tls=True):
    nbd = pytest.importorskip(
        "nbd", reason="libnbd's python module (python3-libnbd) is not importable"
    )
    h = nbd.NBD()
    if tls:
        certs = tmp_path / "tlsdir"
        certs.mkdir(exist_ok=True)
        shutil.copy(pool.cert_path, certs / "ca-cert.pem")
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certs))
        h.set_tls_verify_peer(True)
    else:
        h.set_tls(nbd.TLS_DISABLE)
    return nbd, h


def test_xapi_nbd_serves_raw_content_like_xapi_nbd(hostsim_pool, xapi_session, disk_vm, tmp_path):
    pool, x = hostsim_pool, xapi_session.xenapi
    _, vdi, _ = disk_vm
    (info,) = x.VDI.get_nbd_info(vdi)
    assert set(info) == {"exportname", "address", "port", "cert", "subject"}
    uuid = x.VDI.get_uuid(vdi)
    assert info["exportname"] == "/%s?session_id=%s" % (uuid, xapi_session.handle)
    assert info["cert"] == pool.cert_pem and info["subject"] == "localhost"
    nbd, h = _nbd_handle(pool, tmp_path)
    h.set_export_name(info["exportname"])
    h.connect_tcp(info["address"], info["port"])
    try:
        assert h.get_tls_negotiated() is True
        assert h.get_structured_replies_negotiated() is False
        assert h.can_multi_conn() is False
        assert h.is_read_only() is True
        size = h.get_size()
        assert size == 6 * MiB
        want = content(pool, uuid)
        got = b"".join(h.pread(MiB, off) for off in range(0, size, MiB))
        assert got == want
        assert h.pread(4096, 5 * MiB + 512) == want[5 * MiB + 512 : 5 * MiB + 512 + 4096]
    finally:
        h.shutdown()


def test_xapi_nbd_refuses_plaintext_and_bad_sessions(hostsim_pool, xapi_session, disk_vm, tmp_path):
    pool, x = hostsim_pool, xapi_session.xenapi
    _, vdi, _ = disk_vm
    (info,) = x.VDI.get_nbd_info(vdi)
    nbd, h = _nbd_handle(pool, tmp_path, tls=False)
    h.set_export_name(info["exportname"])
    with pytest.raises(nbd.Error):
        h.connect_tcp(info["address"], info["port"])
    nbd, h = _nbd_handle(pool, tmp_path)
    h.set_export_name(info["exportname"].split("?")[0] + "?session_id=OpaqueRef:stolen")
    with pytest.raises(nbd.Error):
        h.connect_tcp(info["address"], info["port"])


def test_nbd_info_is_empty_without_an_endpoint(hostsim_pool, xapi_session, disk_vm):
    pool, x = hostsim_pool, xapi_session.xenapi
    _, vdi, _ = disk_vm
    pool.api.nbd_address = None
    assert x.VDI.get_nbd_info(vdi) == []
    with pytest.raises(XenAPI.Failure):
        x.VDI.get_nbd_info("OpaqueRef:nope")


def task_outcome(x, task, timeout=10.0):
    """The task's final status (bounded wait: it may still be pending for a moment)."""
    deadline = time.monotonic() + timeout
    status = x.task.get_status(task)
    while status == "pending" and time.monotonic() < deadline:
        time.sleep(0.02)
        status = x.task.get_status(task)
    return status


def test_task_id_follows_the_transfer(hostsim_pool, xapi_session, disk_vm):
    pool, x = hostsim_pool, xapi_session.xenapi
    vm, vdi, snap = disk_vm
    task = pool.api.new_task("export")
    http_get(pool, xapi_session.handle, vdi=snap, format="vhd", task_id=task)
    # As in XAPI, the task ends right after the transfer, not before the client has the response.
    assert task_outcome(x, task) == "success"
    # an import into a disk in use fails, and so does its task
    x.VM.start(vm, False, False)
    task = pool.api.new_task("import")
    with pytest.raises(urllib.error.HTTPError) as err:
        http_put(pool, xapi_session.handle, b"\0" * 512, vdi=vdi, format="raw", task_id=task)
    assert err.value.code == 409
    assert task_outcome(x, task) == "failure"
    # base= naming a VDI without data (cbt_metadata) is a client error
    x.VM.hard_shutdown(vm)
    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi, {})
    x.VDI.data_destroy(s1)
    with pytest.raises(urllib.error.HTTPError) as err:
        http_get(pool, xapi_session.handle, vdi=vdi, format="vhd", base=s1)
    assert err.value.code == 400
