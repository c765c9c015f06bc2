"""The `hostsim` command.

    hostsim serve --root DIR [--xapi-listen HOST:PORT] [--nbd-listen HOST:PORT] [--vms N]
                  [--disk-size SIZE] [--tls] [--gc-interval S] [--no-agent] [--agent-tls off|require]
                  [--hosts N] [--no-agent-on HOST_INDEX]...
    hostsim write [--root DIR] VM [--pattern P] [--count N] [--length SIZE] [--seed N] [--source VM]
    hostsim gc [--root DIR]
    hostsim info [--root DIR] [--vm NAME]
    hostsim stop [--root DIR]

`serve` builds a demo pool (one host, one file SR, a template and N VMs fast-cloned from it, with
realistic data), serves XAPI and xapi-nbd, starts the fastpath agent on the SR root as it would run in
dom0 (when agent.daemon is available), then writes DIR/hostsim.json once everything answers:
{"xapi": {"url", "user", "password", "fingerprint"}, "sr": {"uuid", "root", "path"}, "sm_lock_dir",
 "xapi_nbd": {"host", "port"}, "agent": {... the agent's ready file ...} or null, "vms": [...], "pid",
 "hosts": [{"index", "uuid", "name", "address", "master", "dir", "sr", "agent", "agent_ports",
            "plugin", "xapi_nbd", "agent_log"}], "shared_sr": {"uuid", "root", "path"} or null}
(each VM: "name", "uuid", "vdis", "host" (resident-on uuid), "sr"). `--hosts N` makes a pool of N
hosts (hostsim/host.py, hostsim/agents.py): host i at 127.0.0.<i+1>, its own agent (own ports),
xapi-nbd and local SR, plus a shared SR on every host; the top-level "sr", "agent" and "xapi_nbd"
are the master's.
`serve --daemon` starts the same in the background (log in DIR/hostsim.log) and returns once
hostsim.json is written and XAPI answers, so the next command can use it; `stop` ends it.
The other commands talk to a running `serve` through DIR/hostsim.json (DIR defaults to $HOSTSIM_ROOT,
else the current directory). Exit codes: 0 ok, 1 failure, 2 usage.
"""

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from hostsim.agents import configure_plugin, spawn_agent, start_agent, wait_agent  # noqa: F401
from hostsim.demopool import NULL_REF, build_demo

log = logging.getLogger("hostsim")

SIZES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(Exception):
    pass


def parse_size(text):
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", text.lower())
    if not m:
        raise UsageError("bad size %r" % text)
    return int(float(m.group(1)) * SIZES.get(m.group(2), 1))


def parse_listen(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError("bad address %r (HOST:PORT)" % text)
    return (host.strip("[]") or "0.0.0.0", int(port))


def _root(args):
    return os.path.abspath(args.root or os.environ.get("HOSTSIM_ROOT") or ".")


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# -- serve ----------------------------------------------------------------------------------------


def _agent_available():
    try:
        return importlib.util.find_spec("agent.daemon") is not None
    except ImportError:
        return False


def _check_xapi(url, user, password, cafile=None):
    import ssl
    import xmlrpc.client

    ctx = None
    if url.startswith("https"):
        ctx = ssl.create_default_context(cafile=cafile)
    proxy = xmlrpc.client.ServerProxy(url, context=ctx) if ctx else xmlrpc.client.ServerProxy(url)
    r = proxy.session.login_with_password(user, password, "2.21", "hostsim-check")
    if r.get("Status") != "Success":
        raise RuntimeError("XAPI login failed: %r" % r)
    proxy.session.logout(r["Value"])


def serve_daemon(args, argv, timeout=300.0):
    """`serve --daemon`: the same serve as a detached child; return once it is ready."""
    root = os.path.abspath(_root(args))
    os.makedirs(root, exist_ok=True)
    state = os.path.join(root, "hostsim.json")
    old = _read_state(state)
    if old and _alive(old.get("pid")):
        raise UsageError(
            "a hostsim is already running in %s (pid %s): hostsim stop --root %s"
            % (root, old["pid"], root)
        )
    child_argv = [a for a in argv if a != "--daemon"]
    if "--root" not in child_argv and not any(a.startswith("--root=") for a in child_argv):
        child_argv += ["--root", root]
    log_path = os.path.join(root, "hostsim.log")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hostsim.cli"] + child_argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        info = _read_state(state)
        if info and info.get("pid") == proc.pid:
            print(json.dumps({"ready": state, "xapi": info["xapi"]["url"], "pid": proc.pid}))
            return 0
        if proc.poll() is not None:
            raise RuntimeError(
                "hostsim serve exited with %s before it was ready; see %s"
                % (proc.returncode, log_path)
            )
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError("hostsim serve not ready after %ds; see %s" % (timeout, log_path))
        time.sleep(0.1)


def _read_state(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # absent, or being written (the writer renames it into place)


def _alive(pid):
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_stop(args):
    root = _root(args)
    state = os.path.join(root, "hostsim.json")
    info = _read_state(state)
    if not info or not _alive(info.get("pid")):
        raise UsageError("no running hostsim in %s" % root)
    pid = info["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(pid) and os.path.exists(state):
        if time.monotonic() > deadline:
            raise RuntimeError("hostsim (pid %d) did not stop within 60 s" % pid)
        time.sleep(0.1)
    print(json.dumps({"stopped": pid}))
    return 0


def _sr_json(sr_root, sr):
    return {"uuid": sr.uuid, "root": sr_root, "path": sr.path}


def cmd_serve(args):
    from hostsim.certs import fingerprint
    from hostsim.host import Pool

    if args.hosts < 1:
        raise UsageError("--hosts needs at least 1 host")
    bad = [i for i in args.no_agent_on if not 0 <= i < args.hosts]
    if bad:
        raise UsageError(
            "--no-agent-on %d: no such host (hosts are numbered 0 to %d)" % (bad[0], args.hosts - 1)
        )
    root = _root(args)
    os.makedirs(root, exist_ok=True)
    state = os.path.join(root, "hostsim.json")
    if os.path.exists(state):
        # A previous run: its SR content is unknown to the new (in-memory) database.
        with open(state) as f:
            old = json.load(f)
        old_srs = [h.get("sr", {}) for h in old.get("hosts", [])] + [old.get("sr", {})]
        old_srs.append(old.get("shared_sr") or {})
        for sr in old_srs:
            old_path = sr.get("path")
            parent = os.path.basename(os.path.dirname(old_path or ""))
            if (
                old_path
                and parent in ("sr-mount", "shared-sr-mount")
                and os.path.commonpath([root, os.path.abspath(old_path)]) == root
            ):
                shutil.rmtree(old_path, ignore_errors=True)
        os.unlink(state)
    disk_size = parse_size(args.disk_size)
    pool = Pool(
        root,
        user=args.user,
        password=args.password,
        gc_interval=args.gc_interval,
        hosts=args.hosts,
    )
    for _ref, sr in pool.srs():
        sr.image_format = args.image_format
    from hostsim import datapath

    datapath.set_export_model(pool, args.export_model)
    tpl, vms = build_demo(pool, args.vms, disk_size, seed=args.seed, cbt=not args.no_cbt)
    nbd_listen = parse_listen(args.nbd_listen) if args.nbd_listen else None
    url = pool.start(listen=parse_listen(args.xapi_listen), tls=args.tls, nbd_listen=nbd_listen)
    agents = {}  # host index -> (process, ready info)
    from agent.signalstop import SignalStop

    stop = SignalStop()  # a threading.Event set from a handler can deadlock (agent/signalstop.py)
    stop.install(signal.SIGTERM, signal.SIGINT)
    try:
        with_agent = [h for h in pool.hosts if h.index not in args.no_agent_on]
        if not args.no_agent and _agent_available():
            spawned = [(h, spawn_agent(pool, h.state_dir, args, h)) for h in with_agent]
            for h, (proc, _ready) in spawned:
                agents[h.index] = (proc, None)
            for h, (proc, ready) in spawned:
                agents[h.index] = (proc, wait_agent(proc, ready, h.state_dir))
        elif not args.no_agent:
            log.warning("agent.daemon is not available: serving without the fastpath agent")
        for h in pool.hosts:
            info = agents.get(h.index, (None, None))[1]
            configure_plugin(pool, h.state_dir, info, h, installed=h in with_agent)
        _check_xapi(url, args.user, args.password, cafile=pool.cert_path)
        st = pool.api.store
        vm_rows = []
        for vm in vms:
            vdis = pool.vm_vdis(vm)
            resident = st.field("VM", vm, "resident_on")
            vm_rows.append(
                {
                    "name": st.field("VM", vm, "name_label"),
                    "uuid": st.field("VM", vm, "uuid"),
                    "vdis": [st.field("VDI", v, "uuid") for v in vdis],
                    "host": st.field("host", resident, "uuid") if resident != NULL_REF else None,
                    "sr": st.field("SR", st.field("VDI", vdis[0], "SR"), "uuid") if vdis else None,
                }
            )
        hosts = []
        for h in pool.hosts:
            agent_info = agents.get(h.index, (None, None))[1]
            hosts.append(
                {
                    "index": h.index,
                    "uuid": st.field("host", h.ref, "uuid"),
                    "name": h.name,
                    "address": h.address,
                    "master": h.index == 0,
                    "dir": h.state_dir,
                    "sr": _sr_json(h.sr_root, h.sr),
                    "agent": agent_info,
                    "agent_ports": (
                        {"nbd": agent_info["nbd"][1], "http": agent_info["http"][1]}
                        if agent_info and agent_info.get("nbd") and agent_info.get("http")
                        else None
                    ),
                    "plugin": h in with_agent,
                    "xapi_nbd": (
                        {"host": h.address, "port": pool.nbds[h.index].port} if pool.nbds else None
                    ),
                    "agent_log": os.path.join(h.state_dir, "agent.log") if agent_info else None,
                }
            )
        info = {
            "pid": os.getpid(),
            "xapi": {
                "url": url,
                "user": args.user,
                "password": args.password,
                "fingerprint": fingerprint(pool.cert_pem) if args.tls else None,
                "cafile": pool.cert_path,
            },
            "pool": st.field("pool", pool.pool_ref, "uuid"),
            "host": st.field("host", pool.host_ref, "uuid"),
            "hosts": hosts,
            "sr": _sr_json(pool.sr_root, pool.sr),
            "shared_sr": _sr_json(pool.shared[0], pool.shared[1]) if pool.shared else None,
            "sm_lock_dir": pool.lock_dir,
            "xapi_nbd": {"host": pool.address, "port": pool.nbd.port} if pool.nbd else None,
            "agent": agents.get(0, (None, None))[1],
            "template": st.field("VM", tpl, "uuid"),
            "vms": vm_rows,
        }
        _write_json(state, info)
        print(json.dumps({"ready": state, "xapi": url}), flush=True)
        while not stop.wait(0.5):
            for i, (proc, _info) in agents.items():
                if proc.poll() is not None:
                    log.error("the agent of host %d exited with %s", i, proc.returncode)
                    return 1
        return 0
    finally:
        for proc, _info in agents.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _info in agents.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        pool.stop()
        if os.path.exists(state):
            os.unlink(state)


# -- client commands ------------------------------------------------------------------------------


def _connect(args):
    import XenAPI

    root = _root(args)
    path = os.path.join(root, "hostsim.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise UsageError(
            "no running hostsim in %s (no hostsim.json); start `hostsim serve --root DIR`" % root
        ) from None
    session = XenAPI.Session(
        info["xapi"]["url"], ignore_ssl=info["xapi"]["url"].startswith("https")
    )
    session.xenapi.login_with_password(
        info["xapi"]["user"], info["xapi"]["password"], "2.21", "hostsim-cli"
    )
    return session, info


def _find_vm(x, name):
    if name.startswith("OpaqueRef:"):
        return name
    for ref, rec in x.VM.get_all_records().items():
        if name in (rec["uuid"], rec["name_label"]):
            return ref
    raise UsageError("no VM named %r" % name)


def cmd_write(args):
    session, _ = _connect(args)
    try:
        x = session.xenapi
        vm = _find_vm(x, args.vm)
        spec = {
            "pattern": args.pattern,
            "count": str(args.count),
            "length": str(parse_size(args.length)),
            "seed": str(args.seed),
        }
        if args.source:
            spec["source"] = _find_vm(x, args.source)
        if args.disk is not None:
            spec["disk"] = str(args.disk)
        out = session.xenapi_request("hostsim.write", (vm, spec))
        if args.json:
            print(json.dumps(out, sort_keys=True))
        else:
            for uuid, writes in out.items():
                total = sum(int(n) for _, n in writes)
                print("%s: %d writes, %d bytes (%s)" % (uuid, len(writes), total, args.pattern))
        return 0
    finally:
        session.xenapi.session.logout()


def cmd_gc(args):
    session, _ = _connect(args)
    try:
        out = session.xenapi_request("hostsim.gc", ())
        print(json.dumps(out))
        return 0
    finally:
        session.xenapi.session.logout()


def cmd_info(args):
    root = _root(args)
    try:
        with open(os.path.join(root, "hostsim.json")) as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError("no running hostsim in %s" % root) from None
    if args.vm is None:
        print(text.rstrip())
        return 0
    vms = json.loads(text)["vms"]
    for vm in vms:
        if args.vm in (vm["name"], vm["uuid"]):
            print(vm["uuid"])
            return 0
    raise UsageError(
        "no VM %r in %s (VMs: %s)" % (args.vm, root, ", ".join(v["name"] for v in vms))
    )


def build_parser():
    from hostsim.guest import PATTERNS

    p = argparse.ArgumentParser(
        prog="hostsim", description="a simulated XCP-ng host (XAPI + file SR)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a demo pool and the fastpath agent")
    s.add_argument("--root", help="state directory (default $HOSTSIM_ROOT or .)")
    s.add_argument("--xapi-listen", default="127.0.0.1:0", metavar="HOST:PORT")
    s.add_argument(
        "--nbd-listen", default="127.0.0.1:0", metavar="HOST:PORT", help="xapi-nbd endpoint"
    )
    s.add_argument("--vms", type=int, default=3)
    s.add_argument("--disk-size", default="64M")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--tls", action="store_true", help="serve XAPI over HTTPS with the host certificate"
    )
    s.add_argument(
        "--gc-interval", type=float, default=30.0, help="seconds between SM GC passes (0: off)"
    )
    s.add_argument("--no-cbt", action="store_true", help="do not enable CBT on the VMs' disks")
    s.add_argument(
        "--hosts",
        type=int,
        default=1,
        metavar="N",
        help="hosts in the pool (default 1); with N > 1 each host has its own agent and local "
        "SR, plus one shared SR attached to all, and the VMs are spread over the hosts",
    )
    s.add_argument(
        "--no-agent-on",
        type=int,
        action="append",
        default=[],
        metavar="HOST_INDEX",
        help="start host HOST_INDEX (0 = the master) without the agent and its plugin "
        "(host.call_plugin answers XENAPI_MISSING_PLUGIN there); repeatable",
    )
    s.add_argument(
        "--image-format",
        choices=("vhd", "qcow2"),
        default="vhd",
        help="format of the SR's VDIs: vhd, or qcow2 as XCP-ng 8.3 makes them (<uuid>.qcow2)",
    )
    s.add_argument("--no-agent", action="store_true", help="no agent on any host")
    s.add_argument("--agent-nbd-listen", default="127.0.0.1:0", metavar="HOST:PORT")
    s.add_argument("--agent-http-listen", default="127.0.0.1:0", metavar="HOST:PORT")
    s.add_argument("--agent-tls", choices=("off", "optional", "require"), default="require")
    s.add_argument("--user", default="root")
    s.add_argument("--password", default="hostsim")
    s.add_argument(
        "--export-model",
        choices=("processes", "inline"),
        default="processes",
        help="export_raw_vdi?format=vhd as tapdisk + vhd-tool processes (like XAPI) or inline",
    )
    s.add_argument(
        "--daemon",
        action="store_true",
        help="run in the background (log: DIR/hostsim.log); return once ready (hostsim stop)",
    )
    s.set_defaults(fn=cmd_serve)
    w = sub.add_parser("write", help="guest writes into a VM's disks")
    w.add_argument("--root")
    w.add_argument("vm", help="name, uuid or ref")
    w.add_argument("--pattern", choices=PATTERNS, default="mixed")
    w.add_argument("--count", type=int, default=16)
    w.add_argument("--length", default="64K")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--source", help="VM to copy from (pattern copy)")
    w.add_argument("--disk", type=int, help="only this disk (position)")
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_write)
    g = sub.add_parser("gc", help="run SM's GC now")
    g.add_argument("--root")
    g.set_defaults(fn=cmd_gc)
    i = sub.add_parser("info", help="print hostsim.json (or one VM's uuid)")
    i.add_argument("--root")
    i.add_argument("--vm", metavar="NAME", help="print only this VM's uuid (name or uuid)")
    i.set_defaults(fn=cmd_info)
    t = sub.add_parser("stop", help="stop a running serve (SIGTERM) and wait for it")
    t.add_argument("--root")
    t.set_defaults(fn=cmd_stop)
    return p


def main(argv=None):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "daemon", False):
            return serve_daemon(args, argv)
        return args.fn(args)
    except UsageError as e:
        sys.stderr.write("hostsim: %s\n" % e)
        return 2
    except Exception as e:  # operational failure: one line
        log.debug("failure", exc_info=True)
        sys.stderr.write("hostsim: %s: %s\n" % (type(e).__name__, e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
