"""QCOW2 VDIs of the simulated file SR, as XCP-ng 8.3's SM keeps them (drivers/qcow2util.py).

Files are `<sr>/<uuid>.qcow2` (64 KiB clusters, `qemu-img create -f qcow2`); a child names its
parent by the bare sibling file name (`-b <uuid>.qcow2 -F qcow2`, created in the SR directory);
SM's `hidden` flag lives in a header extension of type "vate" (8 bytes, the first 0 or 1) after
qemu's extensions, before the backing file name. QCOW2 has no uuid of its own: the file name is
the VDI's uuid.

qemu does every data operation, so the agent's reader stays an independent judge of what hostsim
writes: guest writes and reads through a `qemu-nbd` on a Unix socket (one per open image, started
on first use, flushed after every write so the file is complete for any other reader: qemu's
L2/refcount caches go to the file; cache=unsafe skips the fdatasync, as hostsim's VHD writes do),
allocation from `qemu-img map`, coalesce with `qemu-img commit`, relink with `qemu-img rebase -u`.
The same interface as hostsim.vhdfile.VhdFile where hostsim.sm uses one.
"""

import json
import os
import struct
import subprocess
import tempfile
import time

CLUSTER_SIZE = 64 << 10
BLOCK = 2 << 20  # the SR's block grid (allocated() answers 2 MiB block indices, as for VHD)
EXT_SM_HIDDEN = 0x76617465  # "vate"
EXT_END = 0
TIMEOUT = 600


class Qcow2FileError(Exception):
    def __init__(self, path, message):
        super().__init__("%s: %s" % (path, message))
        self.path = path


def _run(cmd, path, cwd=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd)
    if proc.returncode != 0:
        raise Qcow2FileError(path, "%s failed: %s" % (cmd[0], proc.stderr.strip()[-500:]))
    return proc.stdout


def create(path, size=None, parent=None):
    """`qemu-img create -f qcow2` of a new root (size) or of a child of `parent` (a path), SM's way."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % CLUSTER_SIZE]
    if parent is not None:
        cmd += ["-b", os.path.basename(parent), "-F", "qcow2"]
    cmd.append(os.path.basename(path))
    if size is not None:
        cmd.append(str(size))
    if os.path.exists(path):
        raise Qcow2FileError(path, "already exists")
    _run(cmd, path, cwd=os.path.dirname(os.path.abspath(path)))
    return Qcow2File(path, writable=True)


def _uuid_of(path):
    name = os.path.basename(path)
    return name[: -len(".qcow2")] if name.endswith(".qcow2") else name


class _Header(object):
    """What hostsim needs of cluster 0: version, backing name, extensions (kept as bytes)."""

    def __init__(self, path):
        with open(path, "rb") as f:
            head = f.read(CLUSTER_SIZE)
        if head[:4] != b"QFI\xfb":
            raise Qcow2FileError(path, "no QCOW2 magic")
        (self.version,) = struct.unpack(">I", head[4:8])
        self.backing_offset, self.backing_len = struct.unpack(">QI", head[8:20])
        (self.cluster_bits,) = struct.unpack(">I", head[20:24])
        (self.size,) = struct.unpack(">Q", head[24:32])
        if self.version >= 3:
            (self.header_length,) = struct.unpack(">I", head[100:104])
        else:
            self.header_length = 72
        self.backing = None
        if self.backing_offset:
            raw = head[self.backing_offset : self.backing_offset + self.backing_len]
            self.backing = raw.decode("utf-8")
        self.extensions = []  # (type, body)
        pos = self.header_length
        while pos + 8 <= len(head):
            kind, length = struct.unpack(">II", head[pos : pos + 8])
            if kind == EXT_END:
                break
            self.extensions.append((kind, head[pos + 8 : pos + 8 + length]))
            pos += 8 + (length + 7) // 8 * 8

    def hidden(self):
        for kind, body in self.extensions:
            if kind == EXT_SM_HIDDEN and body:
                return bool(body[0])
        return False


def set_hidden_flag(path, hidden):
    """Write SM's "vate" extension (qcow2util._add_or_find_custom_header): after the other
    extensions, before the backing name, which moves down (its offset updated in the header)."""
    h = _Header(path)
    exts = [(k, b) for k, b in h.extensions if k != EXT_SM_HIDDEN]
    exts.append((EXT_SM_HIDDEN, bytes([1 if hidden else 0]) + bytes(7)))
    area = b""
    for kind, body in exts:
        area += struct.pack(">II", kind, len(body)) + body + bytes((-len(body)) % 8)
    area += struct.pack(">II", EXT_END, 0)
    backing = h.backing.encode("utf-8") if h.backing is not None else b""
    end = h.header_length + len(area) + len(backing)
    if end > 1 << h.cluster_bits:
        raise Qcow2FileError(path, "no room in the first cluster for the hidden flag")
    with open(path, "r+b") as f:
        f.seek(h.header_length)
        f.write(area)
        if h.backing is not None:
            off = h.header_length + len(area)
            f.write(backing)
            f.seek(8)
            f.write(struct.pack(">Q", off))
        f.flush()
        os.fsync(f.fileno())


class _Server(object):
    """A qemu-nbd serving one image on a Unix socket, and a libnbd handle on it."""

    def __init__(self, path, writable):
        import nbd

        base = tempfile.gettempdir()
        if len(base) > 60:  # a Unix socket path is at most 107 bytes
            base = "/tmp"
        self.dir = tempfile.mkdtemp(prefix="hostsim-qcow2-", dir=base)
        self.sock = os.path.join(self.dir, "nbd.sock")
        cmd = ["qemu-nbd", "-f", "qcow2", "-k", self.sock, "--cache=unsafe"]
        if not writable:
            cmd.append("-r")
        self.proc = subprocess.Popen(
            cmd + [path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        self.h = nbd.NBD()
        while True:
            try:
                self.h.connect_unix(self.sock)
                break
            except nbd.Error:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = (
                        self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    )
                    self.close()
                    raise Qcow2FileError(path, "qemu-nbd did not start: %s" % err.strip()) from None
                self.h = nbd.NBD()
                time.sleep(0.02)

    def close(self):
        try:
            if self.h is not None:
                self.h.shutdown()
        except Exception:
            pass
        self.h = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        try:
            os.unlink(self.sock)
        except OSError:
            pass
        os.rmdir(self.dir)


class Qcow2File(object):
    """One QCOW2 image of the SR (leaf or hidden parent)."""

    block_size = BLOCK

    def __init__(self, path, writable=False):
        self.path = path
        self.writable = writable
        self._server = None
        self._load()

    def _load(self):
        self.header = _Header(self.path)
        self.size = self.header.size

    # -- what hostsim.sm reads -----------------------------------------------------------------

    @property
    def uuid(self):
        return _uuid_of(self.path)

    @property
    def parent_uuid(self):
        if self.header.backing is None:
            return None
        return _uuid_of(self.header.backing)

    @property
    def hidden(self):
        return self.header.hidden()

    def physical_size(self):
        return os.stat(self.path).st_size

    def allocated(self):
        """2 MiB blocks where this file itself has clusters (data or zero), from qemu-img map."""
        out = _run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", self.path], self.path)
        blocks = set()
        for e in json.loads(out):
            if e["depth"] == 0 and e["present"]:
                first = e["start"] // BLOCK
                last = (e["start"] + e["length"] - 1) // BLOCK
                blocks.update(range(first, last + 1))
        return sorted(blocks)

    # -- I/O through qemu ----------------------------------------------------------------------

    @property
    def serving(self):
        """Whether a qemu-nbd holds the image now."""
        return self._server is not None

    def _nbd(self):
        if self._server is None:
            self._server = _Server(self.path, self.writable and not self.hidden)
        return self._server.h

    def write(self, offset, data):
        if not self.writable:
            raise Qcow2FileError(self.path, "opened read-only")
        if offset < 0 or offset + len(data) > self.size:
            raise Qcow2FileError(
                self.path, "write %d+%d beyond %d" % (offset, len(data), self.size)
            )
        h = self._nbd()
        view = memoryview(data)
        step = 32 << 20  # qemu-nbd's largest request
        for pos in range(0, len(view), step):
            h.pwrite(bytes(view[pos : pos + step]), offset + pos)
        h.flush()  # qemu's cached L2 tables and refcounts into the file: the agent reads it directly

    def read(self, offset, length):
        """Guest bytes through the whole chain, as qemu reads them."""
        if offset < 0 or offset + length > self.size:
            raise Qcow2FileError(self.path, "read %d+%d beyond %d" % (offset, length, self.size))
        out = bytearray()
        h = self._nbd()
        step = 32 << 20
        while len(out) < length:
            n = min(step, length - len(out))
            out += h.pread(n, offset + len(out))
        return bytes(out)

    def close(self):
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def flush(self):
        if self._server is not None:
            self._server.h.flush()

    # -- metadata changes (qemu-img, with no qemu-nbd holding the image) -------------------------

    def set_hidden(self, hidden):
        self.close()
        set_hidden_flag(self.path, hidden)
        self._load()

    def set_uuid(self, uid):
        """QCOW2 has no uuid field: the file name is the uuid (SM renames the file)."""

    def set_parent(self, parent):
        """Re-point at another parent (SM's relink after coalesce: qemu-img rebase -u)."""
        self.close()
        _run(
            [
                "qemu-img",
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                os.path.basename(parent.path),
                os.path.basename(self.path),
            ],
            self.path,
            cwd=os.path.dirname(os.path.abspath(self.path)),
        )
        self._load()

    def commit(self):
        """Write this image's clusters into its backing file (qemu-img commit -d)."""
        self.close()
        _run(["qemu-img", "commit", "-q", "-f", "qcow2", "-d", self.path], self.path)
