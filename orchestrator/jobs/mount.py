"""``fastpath mount REPO ID DIR``, ``fastpath umount DIR``, ``fastpath files REPO ID [PATH]``.

mount (Linux, root): starts ``fastpath serve`` on a loopback port (a process of its own, so the
mount outlives the command), exposes the disk as the file ``DIR/.disk/nbd`` with ``nbdfuse``
(read-only), reads the partition table through that file and loop-mounts every filesystem
read-only at ``DIR/p<N>`` (``DIR/disk`` without a table) as ``orchestrator.serve.mountplan``
decides; LVM physical volumes and swap are listed as skipped with the reason. What was started
is written to ``DIR/.fastpath-mount.json``; umount undoes it in reverse (filesystems, the FUSE
mount, the serve process by its pid). A failure half-way undoes what was done.

files (no root): serves the point in-process and runs libguestfs's ``guestfish --ro`` on the NBD
URI: without PATH it lists the guest's filesystems, with PATH it lists a directory, with
``--extract DIR`` it copies a file or a directory into the local DIR (guestfish copy-out). Where a tool is missing
(nbdfuse, /dev/fuse, mount, guestfish) the error names it and what provides it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from orchestrator.cliutil import CommandFailed, UsageError, add_repo_argument, open_repo

STATE = ".fastpath-mount.json"
START_TIMEOUT = 60.0


def register(registry) -> None:
    p = registry.add("mount", run_mount, help="mount a restore point's filesystems read-only")
    add_repo_argument(p)
    p.add_argument("id", metavar="ID", help="<vm>/<time>, <vm>/latest or latest")
    p.add_argument("dir", metavar="DIR", help="an empty directory")
    p.add_argument("--disk", metavar="UUID", help="the disk (when the point has several)")
    p = registry.add("umount", run_umount, help="undo fastpath mount")
    p.add_argument("dir", metavar="DIR")
    p = registry.add("files", run_files, help="list or extract files of a restore point")
    add_repo_argument(p)
    p.add_argument("id", metavar="ID")
    p.add_argument("path", metavar="PATH", nargs="?", help="a directory or file in the guest")
    p.add_argument("--disk", metavar="UUID")
    p.add_argument("--extract", metavar="DIR", help="copy PATH (file or directory) into DIR")


def require_tools(need_root: bool, tools: tuple[str, ...]) -> None:
    if need_root and os.geteuid() != 0:
        raise CommandFailed(
            "fastpath mount needs root (loop mounts): run it as root, or use "
            "`fastpath files` (libguestfs, no root) or `fastpath serve` + nbdfuse"
        )
    hints = {
        "nbdfuse": "nbdfuse not found: install it (Debian/Ubuntu: apt install nbdfuse)",
        "mount": "mount not found (util-linux)",
        "umount": "umount not found (util-linux)",
        "guestfish": "guestfish not found: install libguestfs (Debian/Ubuntu: apt install "
        "libguestfs-tools; Fedora/RHEL: dnf install guestfs-tools)",
    }
    for tool in tools:
        if shutil.which(tool) is None:
            raise CommandFailed(hints.get(tool, f"{tool} not found"))
    if "nbdfuse" in tools and not os.path.exists("/dev/fuse"):
        raise CommandFailed("/dev/fuse is missing: load the fuse module (modprobe fuse)")


def _start_serve(args) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", args.repo, args.id, "--json"]
    cmd += ["--listen", "127.0.0.1:0", "--progress", "quiet"]
    if args.disk:
        cmd += ["--disk", args.disk]
    if args.passphrase_file:
        cmd += ["--passphrase-file", args.passphrase_file]
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=errors, start_new_session=True, text=True
    )
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(START_TIMEOUT)
    ready = json.loads(line[0]) if line and line[0].strip() else None
    if not ready or not ready.get("ok") or not ready.get("uri"):
        _kill(proc.pid)
        why = (ready or {}).get(
            "error"
        ) or "it did not start (or the point has several disks: --disk)"
        raise CommandFailed(f"fastpath serve {args.id}: {why}")
    return proc, ready


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _wait_for(path: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise CommandFailed(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise CommandFailed(f"{what}: {path} did not appear within {START_TIMEOUT:.0f}s")
        time.sleep(0.05)


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip()[:300]}")


def run_mount(args, ui):
    from orchestrator.serve.mountplan import PartitionTableError, plan_mounts

    require_tools(True, ("nbdfuse", "mount", "umount"))
    target = os.path.abspath(args.dir)
    if not os.path.isdir(target):
        raise CommandFailed(f"directory {target} does not exist")
    if os.listdir(target):
        raise CommandFailed(f"{target} is not empty")
    with open_repo(args) as repo:  # fail early (and ask for the passphrase) here
        point = repo.resolve(args.id)
    args.id = point.id
    state = {"id": point.id, "dir": target, "mounts": [], "serve_pid": None, "fuse": None}
    try:
        serve, ready = _start_serve(args)
        state["serve_pid"] = serve.pid
        state["uri"] = ready["uri"]
        fuse_dir = os.path.join(target, ".disk")
        os.mkdir(fuse_dir)
        fuse = subprocess.Popen(
            ["nbdfuse", "--readonly", fuse_dir, ready["uri"]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        state["fuse"] = fuse_dir
        state["fuse_pid"] = fuse.pid
        disk_file = os.path.join(fuse_dir, "nbd")
        _wait_for(disk_file, fuse, "nbdfuse")
        fd = os.open(disk_file, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            try:
                mounts, skipped = plan_mounts(lambda o, n: os.pread(fd, n, o), size, target)
            except PartitionTableError as exc:
                raise CommandFailed(f"{point.id}: {exc}") from None
        finally:
            os.close(fd)
        state["skipped"] = skipped
        for m in mounts:
            os.mkdir(m["target"])
            _run(["mount", "-t", m["fstype"], "-o", m["options"], disk_file, m["target"]])
            state["mounts"].append(m)
            ui.log(f"mounted {m['partition']} ({m['fstype']}) on {m['target']}")
        for s in skipped:
            ui.log(f"{s['partition']} not mounted: {s['reason']}")
        _save(target, state)
    except BaseException:
        _undo(state)
        raise
    if not mounts:
        ui.log("no filesystem found to mount; the disk is at " + disk_file)
    return {"ok": True, **state}


def _save(target: str, state: dict) -> None:
    with open(os.path.join(target, STATE), "w") as f:
        json.dump(state, f, indent=1)


def _undo(state: dict) -> list[str]:
    problems = []
    for m in reversed(state.get("mounts", [])):
        r = subprocess.run(["umount", m["target"]], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"umount {m['target']}: {r.stderr.strip()}")
        else:
            try:
                os.rmdir(m["target"])
            except OSError:
                pass
    fuse_dir = state.get("fuse")
    if fuse_dir and os.path.ismount(fuse_dir):
        r = subprocess.run(["umount", fuse_dir], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"umount {fuse_dir}: {r.stderr.strip()}")
    if fuse_dir:
        try:
            os.rmdir(fuse_dir)
        except OSError:
            pass
    if state.get("serve_pid"):
        _kill(state["serve_pid"])
    return problems


def run_umount(args, ui):
    target = os.path.abspath(args.dir)
    path = os.path.join(target, STATE)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CommandFailed(f"{target} is not a fastpath mount (no {STATE})") from None
    except ValueError:
        raise CommandFailed(f"{path}: not JSON") from None
    problems = _undo(state)
    if problems:
        raise CommandFailed("; ".join(problems), {"dir": target})
    os.unlink(path)
    return {"ok": True, "dir": target, "id": state.get("id"), "unmounted": state.get("mounts", [])}


def run_files(args, ui):
    from orchestrator.jobs.serve import PointServer

    require_tools(False, ("guestfish",))
    with open_repo(args) as repo:
        point = repo.resolve(args.id)
        server = PointServer(repo, point, disk=args.disk).start()
        try:
            if server.default is None:
                raise UsageError(f"restore point {point.id} has several disks: give --disk")
            uri = server.uri("")
            base = ["guestfish", "--ro", "--format=raw", "-a", uri, "-i"]
            if args.extract:
                if not args.path:
                    raise UsageError("--extract needs PATH")
                cmd = base + ["--", "copy-out", args.path, args.extract]
            elif args.path:
                cmd = base + ["--", "ll", args.path]
            else:
                cmd = [
                    "guestfish",
                    "--ro",
                    "--format=raw",
                    "-a",
                    uri,
                    "--",
                    "run",
                    ":",
                    "list-filesystems",
                ]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        finally:
            server.stop()
    if r.returncode != 0:
        raise CommandFailed(f"guestfish: {(r.stderr or r.stdout).strip()[:400]}")
    return {"ok": True, "id": point.id, "path": args.path, "output": r.stdout.splitlines()}
