"""Build the dom0 bundle: one tarball that installs the agent on a host with only Python 3.6.

    python -m agent.bundle -o dist/ [--version V] [--speedups FILE.so]      (make dom0-bundle)

The tarball (xcp-fastpath-agent-<version>.tar.gz, one top directory of the same name) holds:

    install.sh                      installer: no pip, no compiler, no network (see --help)
    lib/agent/...                   the agent package (Python sources only; no orchestrator/hostsim)
    bin/fastpath-agent              wrapper: `python3 -I` + lib/ on sys.path, relocatable
    bin/fastpath-ensure-cert        ExecStartPre: generates a certificate with openssl if needed
    plugin/fastpath                 the XAPI plugin (-> /etc/xapi.d/plugins/fastpath)
    systemd/fastpath-agent.service  the unit (-> /etc/systemd/system/)
    systemd/agent.conf              default config (-> /etc/fastpath/agent.conf, if absent)
    docs/                           install-dom0.md, http.md, consistency.md (when present)
    VERSION, SHA256SUMS

Compiled speedups are optional: the agent runs on the pure-Python twins. A module built for dom0's
Python (e.g. _speedups.cpython-36m-x86_64-linux-gnu.so) can be added with --speedups; modules built
for other Pythons are left out (they could not load there anyway).

The tarball is reproducible: sorted entries, fixed mtimes (SOURCE_DATE_EPOCH, default 0), root owner.
"""

import argparse
import gzip
import hashlib
import io
import os
import re
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "xcp-fastpath-agent"

WRAPPER = """#!/usr/bin/python3 -I
# fastpath-agent: runs the agent package installed next to this script (../lib), isolated from
# PYTHONPATH and user site-packages. Installed by the xcp-fastpath dom0 bundle.
import os
import sys

LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "lib")
sys.path.insert(0, LIB)

from agent.cli import main  # noqa: E402

sys.exit(main())
"""

EXECUTABLE = 0o755
REGULAR = 0o644


def _version():
    try:
        with open(os.path.join(ROOT, "pyproject.toml")) as f:
            m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
        if m:
            return m.group(1)
    except (OSError, IOError):
        pass
    return "0"


def _read(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        return f.read()


def agent_files():
    """(archive path under lib/, source path) for every Python source of the agent package."""
    out = []
    base = os.path.join(ROOT, "agent")
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, ROOT)
        if rel_dir.split(os.sep)[:2] == ["agent", "plugin"]:
            continue  # the plugin is installed to /etc/xapi.d/plugins, not imported
        for fn in sorted(filenames):
            if fn.endswith((".py", ".pyi")):
                out.append(
                    ("lib/" + "/".join(rel_dir.split(os.sep) + [fn]), os.path.join(dirpath, fn))
                )
    return out


def contents(version, speedups=None):
    """[(archive path, bytes, mode)] of the bundle, sorted by path."""
    items = []
    for arc, src in agent_files():
        with open(src, "rb") as f:
            items.append((arc, f.read(), REGULAR))
    if speedups:
        fn = os.path.basename(speedups)
        if not re.match(r"^_speedups\..*\.so$", fn):
            raise ValueError("--speedups wants a _speedups.<tag>.so file, got %s" % fn)
        with open(speedups, "rb") as f:
            items.append(("lib/agent/" + fn, f.read(), REGULAR))
    items += [
        ("install.sh", _read("agent/bundle_install.sh"), EXECUTABLE),
        ("bin/fastpath-agent", WRAPPER.encode("utf-8"), EXECUTABLE),
        ("bin/fastpath-ensure-cert", _read("systemd/fastpath-ensure-cert"), EXECUTABLE),
        ("plugin/fastpath", _read("agent/plugin/fastpath"), EXECUTABLE),
        ("systemd/fastpath-agent.service", _read("systemd/fastpath-agent.service"), REGULAR),
        ("systemd/agent.conf", _read("systemd/agent.conf"), REGULAR),
        ("VERSION", (version + "\n").encode("ascii"), REGULAR),
    ]
    for doc in ("install-dom0.md", "http.md", "consistency.md"):
        path = os.path.join(ROOT, "docs", doc)
        if os.path.exists(path):
            items.append(("docs/" + doc, _read("docs/" + doc), REGULAR))
    items.sort(key=lambda item: item[0])
    sums = "".join("%s  %s\n" % (hashlib.sha256(data).hexdigest(), arc) for arc, data, _ in items)
    items.append(("SHA256SUMS", sums.encode("ascii"), REGULAR))
    return items


def build(outdir, version=None, speedups=None, mtime=None):
    """Write the tarball into outdir; returns its path."""
    version = version or _version()
    if mtime is None:
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    top = "%s-%s" % (NAME, version)
    if not os.path.isdir(outdir):
        os.makedirs(outdir)
    path = os.path.join(outdir, top + ".tar.gz")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = set()
        for arc, data, mode in contents(version, speedups):
            parts = arc.split("/")[:-1]
            for i in range(len(parts) + 1):
                d = "/".join([top] + parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = _info(d, mtime, 0o755)
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
            info = _info("%s/%s" % (top, arc), mtime, mode)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=mtime) as gz:
            gz.write(raw.getvalue())
    os.rename(tmp, path)
    return path


def _info(name, mtime, mode):
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m agent.bundle", description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", default="dist", metavar="DIR", help="output directory")
    p.add_argument("--version", help="bundle version (default: pyproject.toml's)")
    p.add_argument("--speedups", metavar="SO", help="a prebuilt _speedups module for dom0's Python")
    args = p.parse_args(argv)
    try:
        path = build(args.output, args.version, args.speedups)
    except (OSError, IOError, ValueError) as exc:
        sys.stderr.write("agent.bundle: %s\n" % exc)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
