"""Interop with NBD clients we did not write: nbdinfo, nbdcopy, qemu-img, libnbd (Python bindings).

The agent runs as a subprocess (`python -m agent.daemon serve`). Oracles: `qemu-img convert` and
`qemu-img map` of the same qemu-made dynamic VHD; for differencing chains (which qemu cannot open),
the byte model computed from the writes.
"""

import json
import os
import shutil
import threading

import pytest

from tests.fixtures.nbd import qemu_raw_bytes, run
from tests.fixtures.vhd import Level, pattern

MiB = 1 << 20
BS = 2 * MiB

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")),
    reason="nbdinfo/nbdcopy/qemu-img/qemu-io not installed (make setup installs them)",
)

WRITES = [(0, 3 * MiB, 0x41), (5 * MiB + 4096, 8192, 0x42), (9 * MiB, 512 * 1024, 0x43)]


@pytest.fixture
def qemu_disk(file_sr):
    vdi = file_sr.qemu_vdi(12 * MiB, WRITES)
    return vdi


def qemu_data_blocks(path, block_size=BS):
    """Blocks qemu-img map reports as data (qemu's vpc driver reports whole allocated blocks)."""
    out = json.loads(run(["qemu-img", "map", "--output=json", "-f", "vpc", path]).stdout)
    blocks = set()
    for e in out:
        if e["data"]:
            first = e["start"] // block_size
            last = (e["start"] + e["length"] - 1) // block_size
            blocks.update(range(first, last + 1))
    return blocks


def test_nbdinfo_json_describes_the_export(file_sr, qemu_disk, agent_proc):
    agent = agent_proc([file_sr.root])
    uri = agent.uri(agent.ticket(qemu_disk))
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    (export,) = info["exports"]
    size = json.loads(run(["qemu-img", "info", "--output=json", file_sr.path(qemu_disk)]).stdout)[
        "virtual-size"
    ]
    assert export["export-size"] == size
    assert export["is_read_only"] is True and export["can_multi_conn"] is True
    assert export["can_trim"] is False and export["can_zero"] is False
    assert set(export["contexts"]) >= {"base:allocation", "fastpath:changed"}
    assert export["block_size_preferred"] == BS
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True


def test_nbdinfo_map_matches_qemu(file_sr, qemu_disk, agent_proc, tmp_path):
    agent = agent_proc([file_sr.root])
    uri = agent.uri(agent.ticket(qemu_disk))
    raw = qemu_raw_bytes(file_sr.path(qemu_disk), tmp_path)
    amap = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    assert sum(e["length"] for e in amap) == len(raw)
    for e in amap:
        if e["type"] & 1:  # hole: must read as zeroes in qemu's decoding
            assert e["type"] == 3
            assert not any(raw[e["offset"] : e["offset"] + e["length"]])
    # fastpath:changed without a base = allocated blocks = qemu's data blocks
    cmap = json.loads(run(["nbdinfo", "--map=fastpath:changed", "--json", uri]).stdout)
    changed = set()
    for e in cmap:
        assert e["offset"] % BS == 0 and (
            e["length"] % BS == 0 or e["offset"] + e["length"] == len(raw)
        )
        if e["type"] & 1:
            changed.update(range(e["offset"] // BS, (e["offset"] + e["length"] - 1) // BS + 1))
    assert changed == qemu_data_blocks(file_sr.path(qemu_disk)) == {0, 1, 2, 4}
    # plain text map works too
    text = run(["nbdinfo", "--map", uri]).stdout
    assert "hole,zero" in text and "data" in text


def test_nbdinfo_list(file_sr, qemu_disk, agent_proc):
    agent = agent_proc([file_sr.root], extra=["--list-exports"])
    tid = agent.ticket(qemu_disk)
    info = json.loads(run(["nbdinfo", "--list", "--json", agent.uri("")]).stdout)
    assert [e["export-name"] for e in info["exports"]] == [tid]
    # Default policy: tickets are secrets, the list is empty.
    quiet = agent_proc([file_sr.root])
    quiet.ticket(qemu_disk)
    info = json.loads(run(["nbdinfo", "--list", "--json", quiet.uri("")]).stdout)
    assert info["exports"] == []


def test_nbdcopy_equals_qemu_img_convert(file_sr, qemu_disk, agent_proc, tmp_path):
    agent = agent_proc([file_sr.root])
    uri = agent.uri(agent.ticket(qemu_disk))
    out = str(tmp_path / "copy.raw")
    run(["nbdcopy", uri, out])
    with open(out, "rb") as f:
        assert f.read() == qemu_raw_bytes(file_sr.path(qemu_disk), tmp_path)
    # several connections and requests in flight (CAN_MULTI_CONN is advertised)
    out2 = str(tmp_path / "copy2.raw")
    run(["nbdcopy", "--connections=4", "--requests=16", "--request-size=1048576", uri, out2])
    assert open(out2, "rb").read() == open(out, "rb").read()


def test_qemu_img_compare_against_nbd(file_sr, qemu_disk, agent_proc, tmp_path):
    agent = agent_proc([file_sr.root])
    uri = agent.uri(agent.ticket(qemu_disk))
    r = run(
        ["qemu-img", "compare", "-f", "vpc", "-F", "raw", file_sr.path(qemu_disk), uri], check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # and it notices a difference (the check can fail)
    other = file_sr.qemu_vdi(12 * MiB, WRITES[:2])
    r = run(
        ["qemu-img", "compare", "-f", "vpc", "-F", "raw", file_sr.path(other), uri], check=False
    )
    assert r.returncode == 1


def chain_levels():
    size = 8 * BS
    return [
        Level(size, [(0, pattern(11, 3 * BS)), (6 * BS, pattern(12, BS))]),
        Level(size, [(BS + 512, pattern(13, 4096)), (4 * BS, pattern(14, BS))]),
        Level(size, [(2 * BS, pattern(15, BS)), (6 * BS + 8192, pattern(16, 1024))]),
    ]


def test_nbdcopy_three_deep_chain(file_sr, agent_proc, tmp_path):
    vdis, models = file_sr.chain(chain_levels())
    agent = agent_proc([file_sr.root])
    out = str(tmp_path / "chain.raw")
    run(["nbdcopy", agent.uri(agent.ticket(vdis[-1])), out])
    assert open(out, "rb").read() == bytes(models[-1])


def test_libnbd_multi_conn_and_changed_blocks(file_sr, agent_proc):
    nbd = pytest.importorskip(
        "nbd", reason="libnbd Python bindings (python3-libnbd) not importable"
    )
    vdis, models = file_sr.chain(chain_levels())
    agent = agent_proc([file_sr.root])
    tid = agent.ticket(vdis[-1], base=vdis[0])
    model = bytes(models[-1])
    handles = []
    for _ in range(4):
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.add_meta_context("fastpath:changed")
        h.connect_uri(agent.uri(tid))
        assert h.can_multi_conn()
        handles.append(h)
    results = {}
    errors = []

    def reader(i, h):
        try:
            step = len(model) // 4
            buf = bytearray()
            for off in range(i * step, (i + 1) * step, 1 << 20):
                buf += h.pread(1 << 20, off)
            results[i] = bytes(buf)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i, h)) for i, h in enumerate(handles)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert b"".join(results[i] for i in range(4)) == model
    assert agent.stats()["open_connections"] == 4

    # fastpath:changed relative to the root: blocks written by the mid and the leaf levels
    changed = []

    def cb(metacontext, offset, entries, err):
        if metacontext == "fastpath:changed":
            pos = offset
            for k in range(0, len(entries), 2):
                if entries[k + 1] & 1:
                    changed.extend(range(pos // BS, (pos + entries[k]) // BS))
                pos += entries[k]
        return 0

    handles[0].block_status(len(model), 0, cb)
    assert sorted(changed) == [1, 2, 4, 6]
    for h in handles:
        h.shutdown()
    assert agent.wait_idle()


def test_libnbd_tls_with_and_without_client_certificates(
    file_sr, qemu_disk, agent_proc, tls_files, tmp_path
):
    nbd = pytest.importorskip(
        "nbd", reason="libnbd Python bindings (python3-libnbd) not importable"
    )
    raw = qemu_raw_bytes(file_sr.path(qemu_disk), tmp_path)
    tls_args = ["--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"]]
    agent = agent_proc([file_sr.root], tls="require", extra=tls_args)
    tid = agent.ticket(qemu_disk)

    def tls_handle(certdir):
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(certdir)
        h.set_export_name(tid)
        h.connect_tcp(agent.host, str(agent.port))
        return h

    before = agent.stats()
    h = tls_handle(tls_files["dir"])
    assert h.get_tls_negotiated()
    assert h.pread(len(raw), 0) == raw
    h.shutdown()
    after = agent.stats()
    # No sendfile under TLS: file ranges go through pread + the TLS socket.
    assert after["sendfile_bytes"] == before["sendfile_bytes"]
    assert after["pread_bytes"] > before["pread_bytes"]

    # Many requests in flight over several TLS connections (reader and workers share the TLS
    # socket under the send lock).
    out = str(tmp_path / "tls-copy.raw")
    uri = "nbds://%s:%d/%s?tls-certificates=%s" % (agent.host, agent.port, tid, tls_files["dir"])
    run(["nbdcopy", "--connections=4", "--requests=64", "--request-size=65536", uri, out])
    assert open(out, "rb").read() == raw

    # A client that will not do TLS gets nothing (FORCEDTLS).
    r = run(["nbdinfo", "--json", agent.uri(tid)], check=False)
    assert r.returncode != 0
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_export_name(tid)
    with pytest.raises(nbd.Error):
        h.connect_tcp(agent.host, str(agent.port))

    # Client certificates verified against a CA: with one it works, without it the handshake fails.
    strict = agent_proc(
        [file_sr.root], tls="require", extra=tls_args + ["--tls-client-ca", tls_files["ca"]]
    )
    tid = strict.ticket(qemu_disk)
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(tls_files["client_dir"])
    h.set_export_name(tid)
    h.connect_tcp(strict.host, str(strict.port))
    assert h.pread(4096, 0) == raw[:4096]
    h.shutdown()
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(tls_files["dir"])
    h.set_export_name(tid)
    with pytest.raises(nbd.Error):
        h.connect_tcp(strict.host, str(strict.port))
    assert strict.wait_idle()


def test_tls_optional_serves_both(file_sr, qemu_disk, agent_proc, tls_files, tmp_path):
    nbd = pytest.importorskip(
        "nbd", reason="libnbd Python bindings (python3-libnbd) not importable"
    )
    agent = agent_proc(
        [file_sr.root],
        tls="optional",
        extra=["--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"]],
    )
    tid = agent.ticket(qemu_disk)
    plain = json.loads(run(["nbdinfo", "--json", agent.uri(tid)]).stdout)
    assert plain["TLS"] is False
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(tls_files["dir"])
    h.set_export_name(tid)
    h.connect_tcp(agent.host, str(agent.port))
    assert h.get_tls_negotiated() and h.get_size() == plain["exports"][0]["export-size"]
    h.shutdown()


def test_no_fd_leak_after_clients(file_sr, qemu_disk, agent_proc, tmp_path):
    agent = agent_proc([file_sr.root])
    uri = agent.uri(agent.ticket(qemu_disk))
    baseline = agent.settled_fd_count()
    for _ in range(3):
        run(["nbdcopy", "--connections=4", uri, "null:"])
        run(["nbdinfo", "--map", uri])
    assert agent.wait_idle()
    assert agent.wait_fds(baseline) <= baseline
    assert agent.stats()["open_exports"] == 0
    assert os.path.exists(agent.admin_socket)


def test_several_orchestrators_at_once(file_sr, agent_proc, tmp_path):
    """Three VDIs, three tickets, three nbdcopy processes with four connections each, at once."""
    import subprocess

    disks = [
        file_sr.qemu_vdi(6 * MiB, [(i * MiB, MiB, 0x30 + i), (4 * MiB, 4096, 0x50 + i)])
        for i in range(3)
    ]
    agent = agent_proc([file_sr.root])
    procs = []
    for i, vdi in enumerate(disks):
        out = str(tmp_path / ("o%d.raw" % i))
        cmd = ["nbdcopy", "--connections=4", agent.uri(agent.ticket(vdi)), out]
        procs.append((vdi, out, subprocess.Popen(cmd)))
    for vdi, out, proc in procs:
        assert proc.wait(120) == 0
        with open(out, "rb") as f:
            assert f.read() == qemu_raw_bytes(file_sr.path(vdi), tmp_path)
    assert agent.wait_idle()
    assert agent.stats()["connections"] >= len(disks)  # nbdcopy may open fewer on small disks


def test_serve_from_a_config_file(file_sr, qemu_disk, tmp_path):
    """The INI contract: [agent] sr_roots/admin_socket, [nbd] listen (+ workers), [http] listen,
    [tls] mode."""
    import subprocess
    import sys
    import time

    from agent.tickets import admin_call
    from tests.fixtures.nbd import ROOT

    ini = tmp_path / "agent.ini"
    sock = str(tmp_path / "cfg.sock")
    ready = str(tmp_path / "cfg-ready.json")
    ini.write_text(
        "[agent]\nsr_roots = %s\nadmin_socket = %s\n[nbd]\nlisten = 127.0.0.1:0\nworkers = 0\n"
        "[http]\nlisten = 127.0.0.1:0\n[tls]\nmode = off\n" % (file_sr.root, sock)
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.daemon",
            "serve",
            "--config",
            str(ini),
            "--ready-file",
            ready,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while not os.path.exists(ready):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        with open(ready) as f:
            info = json.load(f)
        assert (
            info["tls"] == "off"
            and info["admin_socket"] == sock
            and info["http"][0] == "127.0.0.1"
            and info["http"][1] > 0
        )
        resp = admin_call(sock, {"op": "create_ticket", "vdi": qemu_disk})
        assert resp["ok"] and resp["nbd"]["uri"].startswith("nbd://127.0.0.1:")
        out = json.loads(run(["nbdinfo", "--json", resp["nbd"]["uri"]]).stdout)
        assert out["exports"][0]["export-name"] == resp["export_name"]
        # workers = 0: requests are served inline by each connection's reader thread
        copy = str(tmp_path / "inline.raw")
        run(["nbdcopy", "--connections=2", resp["nbd"]["uri"], copy])
        assert open(copy, "rb").read() == qemu_raw_bytes(file_sr.path(qemu_disk), tmp_path)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0  # SIGTERM: clean stop
    assert not os.path.exists(sock)
