"""The fastpath agent and its XAPI plugin on each simulated host, as they run in dom0.

Per host: `fastpath-agent serve` on that host's SR roots (its local SR, and the shared SR when
the pool has one), listening on the host's own address (127.0.0.<i+1> in a pool of several
hosts), with its ready file, admin socket and log in the host's state directory; and the
plugin (`agent/plugin/fastpath`) installed on that host only, reading that host's agent.conf
and xensource-inventory. A host started without an agent (`hostsim serve --no-agent-on I`) has
no fastpath plugin at all: host.call_plugin answers XENAPI_MISSING_PLUGIN there, as a real
host without the plugin does.
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT_START_TIMEOUT = 60


def _host(pool, host):
    return pool.hosts[0] if host is None else host


def sr_roots(pool, host=None):
    """The SR mount roots a host's agent serves: its local SR's, then the shared SR's."""
    host = _host(pool, host)
    roots = [host.sr_root]
    if pool.shared is not None:
        roots.append(pool.shared[0])
    return roots


def spawn_agent(pool, root, args, host=None):
    """Start `fastpath-agent serve` for ``host`` (default: the master) with its files in
    ``root``; returns (process, ready-file path) without waiting."""
    host = _host(pool, host)
    ready = os.path.join(root, "agent-ready.json")
    if os.path.exists(ready):
        os.unlink(ready)
    if host.index == 0:
        nbd_listen, http_listen = args.agent_nbd_listen, args.agent_http_listen
    else:
        nbd_listen = http_listen = "%s:0" % host.address
    cmd = [sys.executable, "-m", "agent.daemon", "serve"]
    for r in sr_roots(pool, host):
        cmd += ["--sr-root", r]
    cmd += [
        "--nbd-listen",
        nbd_listen,
        "--http-listen",
        http_listen,
        "--admin-socket",
        os.path.join(root, "agent.sock"),
        "--sm-lock-dir",  # the agent pauses this host's SM-like GC while exports are open
        pool.lock_dir,
        "--tls",
        args.agent_tls,
        "--ready-file",
        ready,
    ]
    if args.agent_tls != "off":
        cmd += ["--tls-cert", host.cert_path, "--tls-key", host.key_path]
    os.makedirs(root, exist_ok=True)
    logf = open(os.path.join(root, "agent.log"), "ab")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=root)
    logf.close()
    return proc, ready


def wait_agent(proc, ready, root, timeout=AGENT_START_TIMEOUT):
    """The agent's ready info once its ready file appears; RuntimeError if it exits first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise RuntimeError(
                "the agent exited with %s (see %s)"
                % (proc.returncode, os.path.join(root, "agent.log"))
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the agent did not become ready in %ds" % timeout)
        time.sleep(0.05)
    with open(ready) as f:
        return json.load(f)


def start_agent(pool, root, args, host=None):
    """Start the agent of ``host`` (default: the master); returns (process, ready info)."""
    proc, ready = spawn_agent(pool, root, args, host)
    return proc, wait_agent(proc, ready, root)


def configure_plugin(pool, root, agent_info, host=None, installed=True):
    """Install the plugin on ``host`` (default: the master): it reads the agent's config
    (FASTPATH_CONFIG) and the host inventory, as in dom0. ``installed=False``: a host without
    the fastpath plugin (its plugin directory has only hostsim's own plugins)."""
    from hostsim import plugins

    host = _host(pool, host)
    os.makedirs(root, exist_ok=True)
    url = pool.server.url if pool.server else None
    if not installed:
        runner = plugins.PluginRunner([os.path.join(pool.root, "plugins")], url)
    else:
        conf = os.path.join(root, "agent.conf")
        lines = ["[agent]", "sr_roots = %s" % ", ".join(sr_roots(pool, host))]
        if agent_info:
            lines.append("admin_socket = %s" % agent_info.get("admin_socket", ""))
            for key in ("nbd", "http"):
                if agent_info.get(key):
                    addr, port = agent_info[key][0], agent_info[key][1]
                    lines += ["[%s]" % key, "listen = %s:%d" % (addr, port)]
            lines += ["[tls]", "mode = %s" % agent_info.get("tls", "off")]
        lines += ["[plugin]", "address = %s" % host.address]
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        inventory = os.path.join(root, "xensource-inventory")
        with open(inventory, "w") as f:
            f.write("INSTALLATION_UUID='%s'\n" % pool.api.store.field("host", host.ref, "uuid"))
        dirs = [os.path.join(pool.root, "plugins"), os.path.join(REPO, "agent", "plugin")]
        runner = plugins.PluginRunner(
            dirs, url, env={"FASTPATH_CONFIG": conf, "FASTPATH_XENSOURCE_INVENTORY": inventory}
        )
    pool.api.host_plugins[host.ref] = runner
    if host.index == 0:
        pool.api.plugins = runner
    return runner
