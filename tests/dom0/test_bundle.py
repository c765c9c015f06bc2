"""The dom0 bundle: builds reproducibly, installs with install.sh alone, runs isolated from the repo.

dom0 has Python 3.6 and nothing else (no pip, no compiler, no network). This machine has 3.11, so:
the installed copy is run with `python3 -I -S` (no PYTHONPATH, no site-packages: only the standard
library and the bundle), vermin checks everything shipped parses as Python 3.6, and the installed
unit is checked by `systemd-analyze verify`.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import pytest

from agent import bundle
from tests.plugin.test_plugin import SHIM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = "/usr/bin/python3"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
TIMEOUT = 60


def run(cmd, **kw):
    kw.setdefault("env", CLEAN_ENV)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    path = bundle.build(str(out), version="9.9.9")
    x = tmp_path_factory.mktemp("extract")
    with tarfile.open(path) as tar:
        tar.extractall(str(x))
    return path, os.path.join(str(x), "xcp-fastpath-agent-9.9.9")


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    _, top = built
    root = str(tmp_path_factory.mktemp("root"))
    r = run(["sh", os.path.join(top, "install.sh"), "--root", root])
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_bundle_is_reproducible_and_complete(built, tmp_path):
    path, top = built
    again = bundle.build(str(tmp_path), version="9.9.9")
    with open(path, "rb") as a, open(again, "rb") as b:
        assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()
    names = set()
    for dirpath, _, files in os.walk(top):
        for fn in files:
            names.add(os.path.relpath(os.path.join(dirpath, fn), top))
    for need in (
        "install.sh",
        "bin/fastpath-agent",
        "bin/fastpath-ensure-cert",
        "plugin/fastpath",
        "systemd/fastpath-agent.service",
        "systemd/agent.conf",
        "lib/agent/http/__init__.py",
        "lib/agent/http/server.py",
        "lib/agent/http/protocol.py",
        "lib/agent/http/limits.py",
        "lib/agent/daemon.py",
        "lib/agent/vhd/chain.py",
        "SHA256SUMS",
        "VERSION",
    ):
        assert need in names, need
    assert not any(n.startswith(("lib/orchestrator", "lib/hostsim", "lib/tests")) for n in names)
    assert not any(n.endswith(".so") for n in names)  # no --speedups: pure-Python twins only
    assert not any("__pycache__" in n for n in names)


def test_everything_shipped_is_python_36(built):
    _, top = built
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    targets = [os.path.join(top, p) for p in ("lib", "bin", "plugin/fastpath")]
    r = run([vermin, "--target=3.6-", "--no-tips", "--violations"] + targets, env=None)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_layout(installed):
    root = installed
    for path, mode in [
        ("opt/fastpath/bin/fastpath-agent", 0o755),
        ("opt/fastpath/bin/fastpath-ensure-cert", 0o755),
        ("etc/xapi.d/plugins/fastpath", 0o755),
        ("etc/systemd/system/fastpath-agent.service", 0o644),
        ("etc/fastpath/agent.conf", 0o644),
        ("opt/fastpath/lib/agent/__init__.py", 0o644),
    ]:
        st = os.stat(os.path.join(root, path))
        assert st.st_mode & 0o777 == mode, path
    assert os.stat(os.path.join(root, "var/lib/fastpath")).st_mode & 0o777 == 0o700
    conf = open(os.path.join(root, "etc/fastpath/agent.conf")).read()
    # No XAPI certificate in this root: the config points to the one generated on first start.
    assert "cert = /var/lib/fastpath/agent.pem" in conf


def test_reinstall_keeps_the_admins_config(built, tmp_path):
    _, top = built
    root = str(tmp_path / "root")
    assert run(["sh", os.path.join(top, "install.sh"), "--root", root]).returncode == 0
    conf = os.path.join(root, "etc/fastpath/agent.conf")
    with open(conf, "a") as f:
        f.write("# edited by the admin\n")
    r = run(["sh", os.path.join(top, "install.sh"), "--root", root])
    assert r.returncode == 0, r.stderr
    assert open(conf).read().endswith("# edited by the admin\n")
    assert os.path.exists(conf + ".new")
    assert not os.path.exists(os.path.join(root, "opt/fastpath/lib.old"))


def test_install_refuses_a_damaged_bundle(built, tmp_path):
    _, top = built
    copy = str(tmp_path / "bundle")
    shutil.copytree(top, copy)
    with open(os.path.join(copy, "lib/agent/http/server.py"), "a") as f:
        f.write("# tampered\n")
    r = run(["sh", os.path.join(copy, "install.sh"), "--root", str(tmp_path / "root")])
    assert r.returncode == 1 and "damaged" in r.stderr


def agent_cmd(root, *args):
    """The installed command, run as dom0 would but without site-packages: `python3 -I -S`."""
    return [PY, "-I", "-S", os.path.join(root, "opt/fastpath/bin/fastpath-agent")] + list(args)


def test_installed_agent_runs_isolated(installed, tmp_path):
    root = installed
    r = run(agent_cmd(root, "--help"), cwd=str(tmp_path))
    assert r.returncode == 0 and "serve" in r.stdout and "ticket" in r.stdout, r.stdout + r.stderr
    r = run(agent_cmd(root, "serve", "--help"), cwd=str(tmp_path))
    assert r.returncode == 0 and "--http-listen" in r.stdout, r.stderr
    # The wrapper's own shebang (#!/usr/bin/python3 -I) works too.
    r = run([os.path.join(root, "opt/fastpath/bin/fastpath-agent"), "--help"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    # Every module of the installed package imports with the standard library alone.
    lib = os.path.join(root, "opt/fastpath/lib")
    code = (
        "import sys, pkgutil, importlib; sys.path.insert(0, %r); import agent; "
        "mods = [m.name for m in pkgutil.walk_packages(agent.__path__, 'agent.')]; "
        "[importlib.import_module(m) for m in mods]; "
        "assert all(m.__file__ is None or m.__file__.startswith(%r) or 'agent' not in n "
        "for n, m in list(sys.modules.items()) if n.startswith('agent') and hasattr(m, '__file__')); "
        "print(len(mods))" % (lib, lib)
    )
    r = run([PY, "-I", "-S", "-c", code], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 10


def test_installed_agent_serves_and_the_installed_plugin_reaches_it(installed, tmp_path):
    root = installed
    sr_root = tmp_path / "sr-mount"
    sr_root.mkdir()
    sock = str(tmp_path / "agent.sock")
    ready = str(tmp_path / "ready.json")
    log = open(str(tmp_path / "agent.log"), "wb")
    proc = subprocess.Popen(
        agent_cmd(
            root, "serve", "--sr-root", str(sr_root), "--tls", "off", "--admin-socket", sock,
            "--nbd-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--ready-file", ready,
        ),
        stdout=log, stderr=subprocess.STDOUT, env=CLEAN_ENV, cwd=str(tmp_path),
    )  # fmt: skip
    try:
        deadline = time.time() + 30
        while not os.path.exists(ready):
            assert proc.poll() is None, open(str(tmp_path / "agent.log")).read()
            assert time.time() < deadline, "agent not ready in 30 s"
            time.sleep(0.05)
        info = json.load(open(ready))
        socket.create_connection(tuple(info["nbd"]), timeout=10).close()
        h = socket.create_connection(tuple(info["http"]), timeout=10)
        try:
            h.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            answer = b""
            while True:
                chunk = h.recv(65536)
                if not chunk:
                    break
                answer += chunk
        finally:
            h.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status": "ok"}\n')
        r = run(agent_cmd(root, "ticket", "list", "--admin-socket", sock, "--json"))
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
        conf = tmp_path / "agent.conf"
        conf.write_text("[agent]\nadmin_socket = %s\n" % sock)
        env = dict(CLEAN_ENV, PYTHONPATH=SHIM, FASTPATH_CONFIG=str(conf))
        import xmlrpc.client

        call = xmlrpc.client.dumps(("OpaqueRef:x", {}), "status")
        r = run([os.path.join(root, "etc/xapi.d/plugins/fastpath"), call], env=env)
        assert r.returncode == 0, r.stderr
        (resp,), _ = xmlrpc.client.loads(r.stdout)
        status = json.loads(resp["Value"])
        assert status["running"] is True and status["pid"] == proc.pid
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def test_installed_unit_passes_systemd_analyze_verify(installed, tmp_path):
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: `make setup` installs the systemd package"
    root = installed
    unit = open(os.path.join(root, "etc/systemd/system/fastpath-agent.service")).read()
    assert "/opt/fastpath/bin/fastpath-agent serve --config /etc/fastpath/agent.conf" in unit
    # verify checks that ExecStart commands exist: point them at the installed copy.
    checked = tmp_path / "fastpath-agent.service"
    checked.write_text(unit.replace("/opt/fastpath", os.path.join(root, "opt/fastpath")))
    r = run([tool, "verify", str(checked)], env=dict(CLEAN_ENV, SYSTEMD_LOG_LEVEL="notice"))
    # verify exits 0 on unknown keys and bad values (it only warns): any output is a failure.
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_systemd_analyze_verify_would_catch_a_bad_unit(installed, tmp_path):
    """The check above can fail: a typo in the unit makes verify speak."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: `make setup` installs the systemd package"
    unit = open(os.path.join(installed, "etc/systemd/system/fastpath-agent.service")).read()
    unit = unit.replace("/opt/fastpath", os.path.join(installed, "opt/fastpath"))
    bad = tmp_path / "fastpath-agent.service"
    bad.write_text(unit.replace("ProtectHome=yes", "ProtectHome=perhaps"))
    r = run([tool, "verify", str(bad)])
    assert "protect home value" in r.stdout + r.stderr


def test_ensure_cert_generates_once_with_openssl(installed, tmp_path):
    tool = os.path.join(installed, "opt/fastpath/bin/fastpath-ensure-cert")
    state = tmp_path / "state"
    cert = state / "agent.pem"
    conf = tmp_path / "agent.conf"
    conf.write_text("[tls]\nmode = require\ncert = %s\nkey =\n" % cert)
    env = dict(CLEAN_ENV, FASTPATH_STATE_DIR=str(state))
    r = run([PY, "-I", "-S", tool, str(conf)], env=env)
    assert r.returncode == 0, r.stderr
    assert os.stat(str(cert)).st_mode & 0o777 == 0o600
    pem = cert.read_bytes()
    assert b"PRIVATE KEY" in pem and b"BEGIN CERTIFICATE" in pem
    r = run(["openssl", "x509", "-in", str(cert), "-noout", "-subject"])
    assert r.returncode == 0 and "CN" in r.stdout
    # The agent loads it (key and certificate in one file).
    import ssl

    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert))
    assert run([PY, "-I", "-S", tool, str(conf)], env=env).returncode == 0
    assert cert.read_bytes() == pem  # not regenerated
    # A missing certificate outside the state dir is the admin's: refused, not generated.
    conf.write_text("[tls]\nmode = require\ncert = %s\n" % (tmp_path / "elsewhere.pem"))
    r = run([PY, "-I", "-S", tool, str(conf)], env=env)
    assert r.returncode == 1 and "missing" in r.stderr
    conf.write_text("[tls]\nmode = off\ncert = /nonexistent.pem\n")
    assert run([PY, "-I", "-S", tool, str(conf)], env=env).returncode == 0


def test_prebuilt_speedups_are_optional_and_named_for_their_python(tmp_path):
    so = tmp_path / "_speedups.cpython-36m-x86_64-linux-gnu.so"
    so.write_bytes(b"\x7fELF stand-in")
    path = bundle.build(str(tmp_path / "out"), version="1", speedups=str(so))
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert "xcp-fastpath-agent-1/lib/agent/_speedups.cpython-36m-x86_64-linux-gnu.so" in names
    bad = tmp_path / "speedups.so"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError):
        bundle.build(str(tmp_path / "out2"), version="1", speedups=str(bad))
    r = run(
        [sys.executable, "-m", "agent.bundle", "-o", str(tmp_path / "o3"), "--speedups", str(bad)],
        cwd=ROOT,
        env=None,
    )
    assert r.returncode == 1 and "speedups" in r.stderr


def test_install_prefix_is_followed_by_the_unit(built, tmp_path):
    _, top = built
    root = str(tmp_path / "root")
    r = run(
        ["sh", os.path.join(top, "install.sh"), "--root", root, "--prefix", "/usr/local/fastpath"]
    )
    assert r.returncode == 0, r.stderr
    unit = open(os.path.join(root, "etc/systemd/system/fastpath-agent.service")).read()
    assert "ExecStart=/usr/local/fastpath/bin/fastpath-agent serve" in unit
    assert "/opt/fastpath" not in unit
    assert os.access(os.path.join(root, "usr/local/fastpath/bin/fastpath-agent"), os.X_OK)
    r = run(["sh", os.path.join(top, "install.sh"), "--prefix", "relative"])
    assert r.returncode == 2


def test_unit_exposure_stays_medium_or_better(installed, tmp_path):
    """systemd's own hardening score for the unit (offline): a weakened unit fails here."""
    import re

    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: `make setup` installs the systemd package"
    unit = open(os.path.join(installed, "etc/systemd/system/fastpath-agent.service")).read()
    checked = tmp_path / "fastpath-agent.service"
    checked.write_text(unit.replace("/opt/fastpath", os.path.join(installed, "opt/fastpath")))
    r = run([tool, "security", "--offline=true", "--no-pager", str(checked)])
    m = re.search(r"Overall exposure level for fastpath-agent.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 6.0, r.stdout
    # The promises the docs make are what systemd sees.
    for line in ("ProtectSystem=", "ProtectHome=", "PrivateTmp=", "NoNewPrivileges="):
        row = [x for x in r.stdout.splitlines() if line in x]
        assert row and row[0].lstrip().startswith("✓"), (line, row)
