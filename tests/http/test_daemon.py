"""The HTTP API of the real daemon (`python -m agent.daemon serve`), read by clients we did not write:
curl (HTTPS, verifying the agent's certificate against the test CA) and Python's http.client.
"""

import hashlib
import http.client
import json
import shutil
import ssl
import subprocess

import pytest

from tests.fixtures.vhd import Level, pattern

MiB = 1 << 20


@pytest.fixture
def served(file_sr, agent_proc, tls_files):
    vdis, models = file_sr.chain(
        [
            Level(6 * MiB, writes=[(0, pattern(11, 2 * MiB)), (4 * MiB + 512, pattern(12, 4096))]),
            Level(6 * MiB, writes=[(2 * MiB, pattern(13, 2 * MiB))]),
        ]
    )
    tls_args = ["--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"]]
    agent = agent_proc(
        [file_sr.root], tls="require", extra=tls_args + ["--http-listen", "127.0.0.1:0"]
    )
    return agent, vdis, [bytes(m) for m in models]


def curl(*args):
    assert shutil.which("curl"), "curl is missing (Debian package curl)"
    return subprocess.run(["curl", "-sS"] + list(args), capture_output=True, timeout=60)


def test_curl_reads_raw_ranges_and_vhd_over_https(served, tls_files, tmp_path, qemu_tools):
    agent, vdis, models = served
    resp = agent.admin(op="create_ticket", vdi=vdis[1])
    url = resp["http"]["url"]
    assert url.startswith("https://127.0.0.1:")
    cacert = ["--cacert", tls_files["ca"]]
    out = tmp_path / "disk.raw"
    r = curl(*cacert, "-o", str(out), url + "/raw")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == models[1]
    r = curl(*cacert, "-r", "4194000-4194999", url + "/raw")
    assert r.returncode == 0 and r.stdout == models[1][4194000:4195000]
    # The ticket as a bearer token, out of the URL.
    base = url.rsplit("/", 1)[0]
    r = curl(
        *cacert,
        "-H",
        "Authorization: Bearer %s" % resp["export_name"],
        base + "/-/raw",
        "-r",
        "0-9",
    )
    assert r.returncode == 0 and r.stdout == models[1][:10]
    vhd = tmp_path / "disk.vhd"
    r = curl(*cacert, "-o", str(vhd), url + "/vhd")
    assert r.returncode == 0, r.stderr
    raw = tmp_path / "model.raw"
    raw.write_bytes(models[1])
    r = subprocess.run(
        ["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(vhd), str(raw)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # Plain HTTP to the TLS port: a clear JSON refusal.
    r = curl("-o", "-", "-w", "%{http_code}", url.replace("https://", "http://") + "/raw")
    assert r.stdout.endswith(b"400") and b"tls_required" in r.stdout


def test_http_client_pinned_by_fingerprint_gets_info_extents_and_metrics(served):
    agent, vdis, models = served
    resp = agent.admin(op="create_ticket", vdi=vdis[1], base=vdis[0])
    host, port = resp["http"]["host"], resp["http"]["port"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust = the pinned fingerprint, checked below
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
    try:
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)
        assert hashlib.sha256(der).hexdigest() == resp["fingerprint"]
        path = "/v1/exports/%s" % resp["export_name"]
        conn.request("GET", path)  # keep-alive: every request below rides this connection
        info = json.loads(conn.getresponse().read())
        assert info["size"] == 6 * MiB and info["base"]["vdi"] == vdis[0]
        assert info["base"]["changed_blocks"] == 1
        conn.request("GET", path + "/extents?context=changed")
        runs = json.loads(conn.getresponse().read())
        assert [(r["start"], r["length"]) for r in runs if r["changed"]] == [(2 * MiB, 2 * MiB)]
        conn.request("GET", path + "/raw", headers={"Range": "bytes=%d-" % (6 * MiB)})
        r = conn.getresponse()
        assert r.status == 416 and json.loads(r.read())["error"] == "range_not_satisfiable"
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        assert 'fastpath_http_requests_total{status="416"} 1' in text
        assert "fastpath_nbd_" in text  # the daemon appends the NBD server's counters
    finally:
        conn.close()


def test_the_ticket_holder_revokes_it_with_delete(served, tls_files, tmp_path):
    """DELETE /v1/exports/<ticket> (curl, HTTPS) ends the ticket for both protocols: the
    agent's ticket list says revoked, nbdinfo can no longer open the export, a repeated DELETE
    answers the same, and a made-up ticket or a sub-resource is refused."""
    agent, vdis, _models = served
    resp = agent.admin(op="create_ticket", vdi=vdis[1])
    url = resp["http"]["url"]
    cacert = ["--cacert", tls_files["ca"]]
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    shutil.copy(tls_files["ca"], tls_dir / "ca-cert.pem")
    nbd = resp["nbd"]
    uri = "nbds://%s:%d/%s?tls-certificates=%s" % (
        nbd["host"], nbd["port"], resp["export_name"], tls_dir
    )  # fmt: skip

    def nbdinfo():
        return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=60)

    assert nbdinfo().stdout.strip() == str(6 * MiB).encode()
    r = curl(*cacert, "-X", "DELETE", "-w", " %{http_code}", url)
    assert r.returncode == 0 and r.stdout.endswith(b" 200"), r
    assert json.loads(r.stdout.rsplit(b" ", 1)[0]) == {"revoked": True}
    listed = agent.admin(op="list_tickets")["tickets"]
    assert [t["revoked"] for t in listed if t["id"] == resp["export_name"]] == [True]
    assert nbdinfo().returncode != 0
    r = curl(*cacert, "-w", " %{http_code}", url + "/raw", "-r", "0-9")
    assert r.stdout.endswith(b" 410") and b"ticket_revoked" in r.stdout
    again = curl(*cacert, "-X", "DELETE", "-w", " %{http_code}", url)
    assert again.stdout.endswith(b" 200") and b"ticket_revoked" in again.stdout
    other = agent.admin(op="create_ticket", vdi=vdis[0])
    base = url.rsplit("/", 1)[0]
    made_up = curl(*cacert, "-X", "DELETE", "-w", " %{http_code}", base + "/" + "ab" * 16)
    assert made_up.stdout.endswith(b" 403") and b"invalid_ticket" in made_up.stdout
    sub = curl(*cacert, "-X", "DELETE", "-w", " %{http_code}", other["http"]["url"] + "/raw")
    assert sub.stdout.endswith(b" 405"), sub
    listed = agent.admin(op="list_tickets")["tickets"]
    assert [t["revoked"] for t in listed if t["id"] == other["export_name"]] == [False]
