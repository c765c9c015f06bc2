"""HTTP serving speed: the agent's HTTP streams vs qemu-nbd + nbdcopy on the same VHD, in one run.

Data: a dynamic VHD of --size bytes (default 2 GiB) with every other 2 MiB block allocated and filled
with pseudo-random bytes (incompressible), made by `qemu-img convert -O vpc` from a sparse raw image.
The agent's HttpServer runs in its own process (TicketStore + FileSR, as the daemon wires it); curl
downloads each stream to /dev/null (a client we did not write, that discards). Every file is warm in
the page cache first; best of --repeat runs.

    GET /blocks  (plaintext: whole blocks by sendfile)      GET /blocks over TLS (pread + SSL)
    GET /vhd     (a full dynamic VHD)                       GET /raw (holes as zeros)
    baseline: qemu-nbd -r -f vpc + nbdcopy ... null:

GB/s counts the virtual disk size per second (holes included) for every row, so rows compare the time
to get the whole disk out; ratios are against the qemu-nbd baseline of the same run.

    .venv/bin/python -m bench.http_serve                # 2 GiB, 3 repeats
    .venv/bin/python -m bench.http_serve --quick        # 256 MiB, 1 repeat (smoke run)
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BS = 2 * 1024 * 1024

# What every in-process agent server of the benchmarks starts with (bench/tls_ab.py too): tickets,
# the SR, counters and the opener of exports; %(root)r and %(sr_root)r are filled in.
OPENER_PRELUDE = r"""
import json, sys, ssl
sys.path.insert(0, %(root)r)
from agent.sr import FileSR
from agent.tickets import TicketStore
from agent.export import Counters
tickets = TicketStore()
sr = FileSR([%(sr_root)r])
counters = Counters()
def opener(t):
    return sr.open_export(t.vdi, t.sr, t.base, counters=counters, name=t.id)
"""

SERVER = (
    OPENER_PRELUDE
    + r"""
from agent.http.server import HttpServer
ctx = None
if %(tls)r:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(%(cert)r, %(key)r)
srv = HttpServer(("127.0.0.1", 0), tickets, opener, tls_context=ctx,
                 tls_mode="require" if %(tls)r else "off").start()
ids = [tickets.create(%(vdi)r, ttl=3600, max_connections=64).id for _ in range(64)]
print(json.dumps({"port": srv.address[1], "tickets": ids}), flush=True)
sys.stdin.read()
srv.stop()
"""
)


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_vhd(path, size, tmp):
    raw = os.path.join(tmp, "src.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(0, size // BS, 2):
            f.seek(i * BS)
            f.write(random.Random(i).randbytes(BS))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, path],
        check=True,
    )
    os.unlink(raw)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", path], capture_output=True, check=True
        ).stdout
    )
    return info["virtual-size"]


def warm(path):
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def curl(url, tls):
    cmd = ["curl", "-s", "-S", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url]
    if tls:
        cmd.insert(1, "-k")
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600).stdout
    elapsed = time.perf_counter() - t0
    code, size = out.split()
    if code != "200":
        raise RuntimeError("%s -> HTTP %s" % (url, code))
    return elapsed, int(size)


def start_server(tmp, sr_root, vdi, tls):
    cert = os.path.join(tmp, "cert.pem")
    key = os.path.join(tmp, "key.pem")
    if tls and not os.path.exists(cert):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
             "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
    code = SERVER % {
        "root": ROOT, "sr_root": sr_root, "vdi": vdi, "tls": tls, "cert": cert, "key": key
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    info = json.loads(proc.stdout.readline())
    return proc, info


def best(fn, repeat):
    return min(fn() for _ in range(repeat))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="2G")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="256 MiB, 1 repeat")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    size = parse_size("256M" if args.quick else args.size)
    repeat = 1 if args.quick else args.repeat
    tmp = tempfile.mkdtemp(prefix="bench-http-")
    procs = []
    try:
        sr = str(uuid.uuid4())
        vdi = str(uuid.uuid4())
        os.makedirs(os.path.join(tmp, "sr", sr))
        path = os.path.join(tmp, "sr", sr, vdi + ".vhd")
        vsize = make_vhd(path, size, tmp)
        warm(path)
        rows = {}
        tickets = iter(())
        for tls in (False, True):
            proc, info = start_server(tmp, os.path.join(tmp, "sr"), vdi, tls)
            procs.append(proc)
            tickets = iter(info["tickets"])
            scheme = "https" if tls else "http"
            base = "%s://127.0.0.1:%d/v1/exports/" % (scheme, info["port"])
            streams = ("blocks",) if tls else ("blocks", "vhd", "raw")
            for stream in streams:
                name = "agent HTTP%s /%s" % ("S" if tls else "", stream)

                def fetch(s=stream, b=base, it=tickets, t=tls):
                    return curl(b + next(it) + "/" + s, t)[0]

                rows[name] = best(fetch, repeat)
            proc.stdin.close()
            proc.wait(30)
        port = free_port()
        qemu = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "vpc", "-t", "-p", str(port), "-b", "127.0.0.1", path]
        )
        procs.append(qemu)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

        def nbdcopy():
            t0 = time.perf_counter()
            subprocess.run(["nbdcopy", "nbd://127.0.0.1:%d" % port, "null:"], check=True)
            return time.perf_counter() - t0

        rows["qemu-nbd + nbdcopy (baseline)"] = best(nbdcopy, repeat)
        base_t = rows["qemu-nbd + nbdcopy (baseline)"]
        result = {
            "size": vsize,
            "allocated": "every other 2 MiB block, random data",
            "seconds": rows,
            "gbps": {k: vsize / v / 1e9 for k, v in rows.items()},
            "ratio_vs_qemu_nbd": {k: base_t / v for k, v in rows.items()},
        }
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            print("disk %.2f GiB, every other 2 MiB block allocated (random data), best of %d"
                  % (vsize / (1 << 30), repeat))  # fmt: skip
            for k, v in rows.items():
                print("  %-34s %7.3f s  %6.2f GB/s  x%.2f vs qemu-nbd"
                      % (k, v, vsize / v / 1e9, base_t / v))  # fmt: skip
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
