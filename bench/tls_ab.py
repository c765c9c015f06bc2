"""TLS serving, one source tree against another in the same run: the agent's NBD server and its
HTTPS /blocks stream, each started from --base's code and from this tree's, read in turns
(base, this, base, this, ...) so load from elsewhere on the machine falls on both alike.

Data: a dynamic VHD of --size bytes, every other 2 MiB block allocated with random bytes
(bench/http_serve.py's make_vhd), warm in the page cache. Clients we did not write, discarding:
``nbdcopy --connections=N nbds://... null:`` and ``curl -k .../blocks -o /dev/null``. Reported per
tree and method: median wall seconds and median CPU seconds of the server process (from
/proc/PID/stat: steadier than wall time on a shared machine), with every sample.

    git archive main | tar -x -C /tmp/main-tree
    .venv/bin/python -m bench.tls_ab --base /tmp/main-tree --size 1G --rounds 7
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import http_serve as hs  # noqa: E402

NBD_SERVER = (
    hs.OPENER_PRELUDE
    + r"""
from agent.nbd.server import NBDServer
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(%(cert)r, %(key)r)
srv = NBDServer(tickets, opener, port=0, tls_mode="require", ssl_context=ctx,
                counters=counters).start()
ids = [tickets.create(%(vdi)r, ttl=3600, max_connections=64).id for _ in range(64)]
print(json.dumps({"port": srv.address[1], "tickets": ids}), flush=True)
sys.stdin.read()
srv.stop()
"""
)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(code):
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    return proc, json.loads(proc.stdout.readline())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the other source tree (e.g. git archive main)")
    p.add_argument("--size", default="1G")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--connections", type=int, default=4, help="nbdcopy --connections")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    trees = {"base": os.path.abspath(args.base), "this": ROOT}
    tmp = tempfile.mkdtemp(prefix="bench-tls-ab-")
    procs = []
    try:
        sr_root = os.path.join(tmp, "sr")
        vdi = str(uuid.uuid4())
        os.makedirs(os.path.join(sr_root, str(uuid.uuid4())))
        path = os.path.join(sr_root, os.listdir(sr_root)[0], vdi + ".vhd")
        size = hs.make_vhd(path, hs.parse_size(args.size), tmp)
        hs.warm(path)
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
             "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        servers = {}
        for tree, root in trees.items():
            fill = {"root": root, "sr_root": sr_root, "vdi": vdi, "cert": cert, "key": key}
            servers[(tree, "nbd")] = start(NBD_SERVER % fill)
            servers[(tree, "https")] = start(hs.SERVER % dict(fill, tls=True))
        procs = [proc for proc, _ in servers.values()]
        tickets = {k: iter(info["tickets"]) for k, (_, info) in servers.items()}
        samples = {k: {"wall": [], "server_cpu": []} for k in servers}
        for _ in range(args.rounds):
            for (tree, method), (proc, info) in servers.items():
                ticket = next(tickets[(tree, method)])
                before = cpu_seconds(proc.pid)
                t = time.perf_counter()
                if method == "nbd":
                    uri = "nbds://127.0.0.1:%d/%s?tls-verify-peer=false" % (info["port"], ticket)
                    subprocess.run(
                        ["nbdcopy", "--connections=%d" % args.connections, uri, "null:"],
                        check=True,
                    )
                else:
                    url = "https://127.0.0.1:%d/v1/exports/%s/blocks" % (info["port"], ticket)
                    hs.curl(url, True)
                samples[(tree, method)]["wall"].append(time.perf_counter() - t)
                samples[(tree, method)]["server_cpu"].append(cpu_seconds(proc.pid) - before)
        result = {
            "size": size,
            "rounds": args.rounds,
            "connections": args.connections,
            "rows": [
                {
                    "tree": tree,
                    "method": method,
                    "wall_median": statistics.median(s["wall"]),
                    "server_cpu_median": statistics.median(s["server_cpu"]),
                    "samples": s,
                }
                for (tree, method), s in samples.items()
            ],
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print("disk %.2f GiB, every other 2 MiB block allocated, %d rounds, load average %.1f"
                  % (size / (1 << 30), args.rounds, os.getloadavg()[0]))  # fmt: skip
            for r in result["rows"]:
                print("  %-5s %-6s wall %6.3f s  server CPU %6.3f s" % (
                    r["tree"], r["method"], r["wall_median"], r["server_cpu_median"]))  # fmt: skip
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
