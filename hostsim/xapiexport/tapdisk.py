"""hostsim's tapdisk: a process that opens a VDI's VHD chain and serves raw sector reads on a ring.

On a real host `export_raw_vdi` first attaches the VDI to dom0 (`Sm_fs_ops.with_block_attached_device
... RO`, xapi-project/xen-api `ocaml/xapi/export_raw_vdi.ml`): SM starts a tapdisk process that opens
the VHD chain and exposes it as the raw block device /dev/xen/blktap-2/tapdevN through the blktap
kernel driver. This process is that tapdisk; the unix socket it is given (fd) stands for the blktap
ring, with the ring's limits (hostsim/xapiexport/blkif.py: 11 pages per request, 32 requests in flight).

Modelled facts:
- tapdisk's image drivers open their files with O_DIRECT and fall back to buffered I/O with a warning
  when the file system refuses it (Xen's blktap drivers, e.g. `tdvmdk_open`: `O_DIRECT | O_LARGEFILE`,
  "Maybe O_DIRECT isn't supported", retried without it). Here: every file of the chain is opened a
  second time with O_DIRECT for the data reads (metadata comes from agent.vhd's buffered reader, read
  once at open like tapdisk's BAT and bitmap caches); EINVAL at open or at the first read switches that
  file to buffered reads, and a note goes to stderr. O_DIRECT means the page cache does not help XAPI's
  way, as on a real host.
- Each request is resolved through the chain sector by sector (a clear bitmap bit asks the parent,
  a parent smaller than the child reads as zeros), as tapdisk's vhd driver does, with agent.vhd's
  per-file `sectors_present`.
- Requests are served concurrently, up to the ring size (tapdisk submits its reads as asynchronous I/O
  and completes them out of order): BLKTAP_RING_SIZE worker threads. Each reads into the pages of the
  request's ring slot, shared with the reader (--data-fd, a memfd: blktap maps the request's pages into
  tapdisk), page-aligned as O_DIRECT needs.

Usage: python -m hostsim.xapiexport.tapdisk --ring-fd N --data-fd D --vhd LEAF.vhd [--parent-pid PID]
       [--buffered]
Exit status: 0 when the ring's other end closed (vhd-tool done: the VDI is detached), 1 on a failure to
open the chain, 2 on a usage error.
"""

import argparse
import errno
import mmap
import os
import queue
import socket
import sys
import threading

from hostsim.xapiexport import blkif, procutil


class Disk:
    """The chain as tapdisk sees it: levels (leaf first) with a data fd each, O_DIRECT when possible."""

    def __init__(self, path, direct=True):
        from agent import vhd

        self.chain = vhd.open_chain(path)
        self.levels = list(self.chain.files)
        self.size_sectors = self.chain.size // blkif.SECTOR
        self.fds = []
        self.direct = []
        self.notes = []
        self._lock = threading.Lock()
        try:
            for f in self.levels:
                fd, is_direct = self._open_data(f.path, direct)
                self.fds.append(fd)
                self.direct.append(is_direct)
        except BaseException:
            self.close()
            raise

    def _open_data(self, path, direct):
        flag = getattr(os, "O_DIRECT", 0)
        if direct and flag:
            try:
                return os.open(path, os.O_RDONLY | flag), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.notes.append("%s: O_DIRECT refused by the file system, buffered reads" % path)
        return os.open(path, os.O_RDONLY), False

    def _fall_back(self, li, err):
        with self._lock:
            if not self.direct[li]:
                return
            fd = os.open(self.levels[li].path, os.O_RDONLY)
            old, self.fds[li] = self.fds[li], fd
            self.direct[li] = False
            os.close(old)
            self.notes.append(
                "%s: O_DIRECT read failed (%s), buffered reads" % (self.levels[li].path, err)
            )
            procutil.note("tapdisk", self.notes[-1])

    def resolve(self, first, count):
        """[(start, sectors, level index or None, byte offset in that level's file)], sorted."""
        from agent.vhd.file import BEYOND

        out = []
        pending = [(first, count, 0)]
        while pending:
            s, n, li = pending.pop()
            if li >= len(self.levels):
                out.append((s, n, None, 0))
                continue
            for rs, rn, where in self.levels[li].sectors_present(s, n):
                if where is None:
                    pending.append((rs, rn, li + 1))
                elif where == BEYOND:
                    out.append((rs, rn, None, 0))
                else:
                    out.append((rs, rn, li, where))
        out.sort()
        return out

    def read_into(self, first, count, view):
        """Guest sectors [first, first + count) into view (page-aligned, count * 512 bytes)."""
        for s, n, li, where in self.resolve(first, count):
            a = (s - first) * blkif.SECTOR
            b = a + n * blkif.SECTOR
            if li is None:
                view[a:b] = bytes(b - a)
                continue
            self._pread(li, view[a:b], where)

    def _pread(self, li, view, offset):
        done = 0
        want = len(view)
        while done < want:
            try:
                got = os.preadv(self.fds[li], [view[done:]], offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL and self.direct[li]:
                    self._fall_back(li, e)
                    continue
                raise
            if got <= 0:
                view[done:] = bytes(
                    want - done
                )  # past the file's end: zeros (never in a valid VHD)
                return
            done += got

    def close(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        self.chain.close()


def serve(sock, disk, data):
    """Answer ring requests until the other end closes, the data landing in `data` (the shared ring
    data area, BLKTAP_RING_SIZE slots). Returns normally on a clean close."""
    requests = queue.Queue()
    send_lock = threading.Lock()
    failed = []

    def worker():
        while True:
            item = requests.get()
            if item is None:
                return
            rid, slot, first, count = item
            status = blkif.check_request(first, count, disk.size_sectors, slot)
            if status == 0:
                a, _ = blkif.slot_range(slot)
                try:
                    disk.read_into(first, count, data[a : a + count * blkif.SECTOR])
                except OSError as e:
                    status = -(e.errno or errno.EIO)
            try:
                with send_lock:
                    sock.sendall(blkif.RSP.pack(rid, status))
            except OSError as e:
                failed.append(e)
                return

    workers = [
        threading.Thread(target=worker, name="tapdisk-aio-%d" % i, daemon=True)
        for i in range(blkif.BLKTAP_RING_SIZE)
    ]
    for t in workers:
        t.start()
    buf = bytearray()
    size = blkif.REQ.size
    try:
        while not failed:
            try:
                chunk = sock.recv(size * blkif.BLKTAP_RING_SIZE)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            k = len(buf) // size
            for i in range(k):
                requests.put(blkif.REQ.unpack_from(buf, i * size))
            del buf[: k * size]
    finally:
        for _ in workers:
            requests.put(None)
        for t in workers:
            t.join(30)


def main(argv=None):
    p = argparse.ArgumentParser(prog="tapdisk (hostsim)")
    p.add_argument("--ring-fd", type=int, required=True)
    p.add_argument("--data-fd", type=int, required=True)
    p.add_argument("--vhd", required=True)
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--buffered", action="store_true", help="no O_DIRECT (for comparison only)")
    args = p.parse_args(argv)
    procutil.die_with_parent(args.parent_pid)
    sock = socket.socket(fileno=args.ring_fd)
    try:
        mem = mmap.mmap(args.data_fd, blkif.RING_DATA_BYTES)
    except (OSError, ValueError) as e:
        procutil.note("tapdisk", "cannot map the ring's data pages: %s" % e)
        sock.close()
        return 1
    os.close(args.data_fd)
    try:
        disk = Disk(args.vhd, direct=not args.buffered)
    except Exception as e:
        procutil.note("tapdisk", "cannot open %s: %s" % (args.vhd, e))
        sock.close()
        mem.close()
        return 1
    for n in disk.notes:
        procutil.note("tapdisk", n)
    data = memoryview(mem)
    try:
        serve(sock, disk, data)
    finally:
        sock.close()
        disk.close()
        data.release()
        mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
