"""The SR settings of the agent's config ([agent] sm_*, [lvm]) and the Storage they build."""

import os
import uuid as uuidlib

import pytest

from agent import config, smlock
from agent import sr as sr_mod


def _conf(tmp_path, text):
    p = tmp_path / "agent.conf"
    p.write_text(text)
    return str(p)


def test_defaults_are_xcp_ng():
    cfg = config.load()
    assert cfg.sm_lock_dir == "/var/lock/sm"
    assert cfg.sm_ipc_dir == "/var/run/sm/ipc"
    assert cfg.lvm == "auto"
    assert cfg.lvm_lvs == "lvs" and cfg.lvm_lvchange == "lvchange" and cfg.lvm_dev_dir == "/dev"


def test_ini_settings(tmp_path):
    cfg = config.load(
        _conf(
            tmp_path,
            "[agent]\nsm_lock_dir = /x/lock\nsm_ipc_dir =\ngc_abort_timeout = 5\n"
            "sr_lock_timeout = 1.5\n[lvm]\nenabled = no\nlvs = /sbin/lvs\ndev_dir = /devx\n",
        )
    )
    assert cfg.sm_lock_dir == "/x/lock" and cfg.sm_ipc_dir is None
    assert cfg.gc_abort_timeout == 5.0 and cfg.sr_lock_timeout == 1.5
    assert cfg.lvm is False and not cfg.lvm_enabled()
    assert cfg.lvm_lvs == "/sbin/lvs" and cfg.lvm_dev_dir == "/devx"
    storage = sr_mod.from_config(cfg)
    assert storage.lvm_sr is None
    assert storage.locks.lock_dir == "/x/lock" and storage.locks.ipc_dir is None
    assert storage.locks.abort_timeout == 5.0


def test_empty_lock_dir_disables_the_pause(tmp_path):
    cfg = config.load(_conf(tmp_path, "[agent]\nsm_lock_dir =\n"))
    storage = sr_mod.from_config(cfg)
    assert not storage.locks.enabled
    assert config.load(sm_lock_dir="").sm_lock_dir == ""  # --sm-lock-dir ''


@pytest.mark.parametrize("value, expect", [("yes", True), ("auto", "auto"), ("off", False)])
def test_lvm_enabled_values(tmp_path, value, expect):
    cfg = config.load(_conf(tmp_path, "[lvm]\nenabled = %s\n" % value))
    assert cfg.lvm == expect


def test_lvm_auto_follows_the_lvs_command(tmp_path):
    cfg = config.load(lvm_lvs=str(tmp_path / "no-such-lvs"))
    assert not cfg.lvm_enabled()
    fake = tmp_path / "lvs"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    cfg = config.load(lvm_lvs=str(fake))
    assert cfg.lvm_enabled()
    assert sr_mod.from_config(cfg).lvm_sr is not None


def test_bad_values(tmp_path):
    with pytest.raises(config.ConfigError):
        config.load(_conf(tmp_path, "[lvm]\nenabled = maybe\n"))
    with pytest.raises(config.ConfigError):
        config.load(_conf(tmp_path, "[agent]\ngc_abort_timeout = -1\n"))
    with pytest.raises(config.ConfigError):
        config.load(_conf(tmp_path, "[agent]\nsr_lock_timeout = soon\n"))


def test_storage_says_where_it_looked(tmp_path):
    root = tmp_path / "srs"
    root.mkdir()
    fake = tmp_path / "lvs"
    fake.write_text("#!/bin/sh\necho '  Volume group not found' >&2\nexit 5\n")
    fake.chmod(0o755)
    cfg = config.load(sr_roots=[str(root)], lvm=True, lvm_lvs=str(fake), sm_lock_dir="")
    storage = sr_mod.from_config(cfg)
    vdi, sr = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    with pytest.raises(sr_mod.VDINotFound) as err:
        storage.open_export(vdi, sr)
    msg = str(err.value)
    assert vdi in msg and str(root) in msg and "LVM" in msg and "exit 5" in msg
    assert isinstance(storage.locks, smlock.SMLocks)
    assert not os.path.exists(str(tmp_path / "lock"))


def test_http_limits_from_the_ini_reach_the_server(tmp_path):
    """[http] max_connections and timeouts are read, checked and handed to the HTTP server."""
    from agent import daemon

    text = (
        "[agent]\nsr_roots = %s\nadmin_socket = %s\nsm_lock_dir =\n[lvm]\nenabled = no\n"
        "[nbd]\nlisten = 127.0.0.1:0\n[http]\nlisten = 127.0.0.1:0\nmax_connections = 3\n"
        "header_timeout = 2.5\nidle_timeout = 7\nsend_timeout = 9\n[tls]\nmode = off\n"
    ) % (tmp_path, tmp_path / "admin.sock")
    cfg = config.load(_conf(tmp_path, text))
    assert (cfg.http_max_connections, cfg.http_header_timeout) == (3, 2.5)
    agent = daemon.Agent(cfg)
    limits = agent.http.limits
    assert (limits.max_connections, limits.header_timeout) == (3, 2.5)
    assert (limits.idle_timeout, limits.send_timeout) == (7.0, 9.0)


@pytest.mark.parametrize(
    "line, message",
    [
        ("header_timeout = 0", "header_timeout must be positive"),
        ("send_timeout = -1", "send_timeout must be positive"),
        ("max_connections = 0", "http_max_connections must be at least 1"),
        ("idle_timeout = soon", "bad config"),
    ],
)
def test_bad_http_limits_are_refused(tmp_path, line, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(_conf(tmp_path, "[http]\n%s\n" % line))


def test_shipped_config_and_documented_ini_say_the_defaults(tmp_path):
    """systemd/agent.conf (installed as /etc/fastpath/agent.conf) and the INI block of
    docs/install-dom0.md parse, and every value they state is the built-in default: the files
    people read cannot drift from what the agent does without them."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    doc = open(os.path.join(root, "docs", "install-dom0.md")).read()
    block = re.search(r"```ini\n(.*?)```", doc, re.S).group(1)
    block = re.sub(r"(?m)^\s+;.*\n", "", block)  # continuation comment lines
    block = re.sub(r"(?ms)^\[plugin\].*?(?=^\[|\Z)", "", block)  # read by the plugin only
    documented = _conf(tmp_path, block)
    defaults = config.load().to_dict()
    for path in (os.path.join(root, "systemd", "agent.conf"), documented):
        assert config.load(path).to_dict() == defaults, path
