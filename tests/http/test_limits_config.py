"""The issue-13 limits have config keys ([nbd], [http] of agent.conf) that reach the servers."""

import pytest

from agent import config
from agent.daemon import Agent


def _conf(tmp_path, text):
    p = tmp_path / "agent.conf"
    p.write_text(text)
    return str(p)


def test_limit_keys_are_read_and_reach_the_servers(tmp_path):
    path = _conf(
        tmp_path,
        "[agent]\nsr_roots = %s\nadmin_socket = %s\n"
        "[nbd]\nlisten = 127.0.0.1:0\nmax_block_status_descriptors = 100\nmax_handshakes = 7\n"
        "max_handshakes_per_address = 3\nhandshake_timeout = 2\n"
        "[http]\nlisten = 127.0.0.1:0\nmax_unauthenticated = 5\n"
        "max_unauthenticated_per_address = 2\nunauthenticated_timeout = 1.5\n[tls]\nmode = off\n"
        % (tmp_path, tmp_path / "a.sock"),
    )
    cfg = config.load(path)
    agent = Agent(cfg)
    assert agent.nbd.max_descriptors == 100 and agent.nbd.handshake_timeout == 2
    b = agent.nbd.slots.budget
    assert (b.max_unauthenticated, b.max_per_address, b.evict_idle_authenticated) == (7, 3, False)
    lim = agent.http.limits
    assert (lim.max_unauthenticated, lim.max_unauthenticated_per_address) == (5, 2)
    assert lim.unauthenticated_timeout == 1.5
    assert agent.http.slots.budget.max_per_address == 2


@pytest.mark.parametrize(
    "section, line",
    [
        ("nbd", "max_block_status_descriptors = 0"),
        ("nbd", "max_handshakes = 0"),
        ("http", "max_unauthenticated_per_address = 0"),
        ("http", "unauthenticated_timeout = 0"),
        ("http", "max_unauthenticated = many"),
    ],
)
def test_bad_limit_values_are_refused(tmp_path, section, line):
    with pytest.raises(config.ConfigError):
        config.load(_conf(tmp_path, "[%s]\n%s\n" % (section, line)))
