"""hostsim's vhd-tool: `vhd-tool stream --source-format hybrid ... --destination-format vhd`.

What xapi runs for export_raw_vdi?format=vhd (xapi-project/xen-api `ocaml/xapi/vhd_tool_wrapper.ml`,
`send`): `vhd-tool stream --source-protocol none --source-format hybrid --source <tapdev>:<leaf.vhd>
--destination-protocol none --destination-format vhd --destination-fd <uuid> [--relative-to <base.vhd>]
--progress --machine --direct`, the client's socket passed as that fd (`safe_close_and_exec ... [s', s]`)
and vhd-tool's stdout a pipe on which xapi reads progress ("%03d" per percent, `machine_progress_bar`
in `ocaml/vhd-tool/src/impl.ml`, read 3 bytes at a time by `run_vhd_tool`).

Modelled facts, from xapi-project/xen-api `ocaml/vhd-tool/src/impl.ml` (`make_stream` "hybrid","vhd":
`Vhd_IO.openchain` on the VHD for the metadata, `Hybrid_input.vhd ?from raw t` for the data) and
mirage/ocaml-vhd `lib/f.ml` (`vhd_common ~raw`):
- the blocks to send come from the VHD metadata (BATs of the chain, and of the base with
  --relative-to), never from the data;
- the data of every sector comes from the raw device (`Copy(raw, absolute_sector, 1)`), consecutive
  sectors coalesced into one copy per block (`coalesce_request`), so one 2 MiB copy per block;
- `stream_raw` writes `Sectors` elements (footer, header, BAT, each block's bitmap) with
  `really_write` and each `Copy` with `Channels.copy_from` -> `direct_copy`
  (`ocaml/vhd-tool/src/channels.ml`, `direct_copy_stubs.c`): read() of up to XFER_BUFSIZ = 2 MiB from
  the device into one page-aligned buffer, then write() of it to the destination, one block at a time;
- `--direct`: the device is read unbuffered (O_DIRECT). hostsim's "device" is the tapdisk ring, and
  the kernel's part of a device read is done here: the read is cut into blktap requests
  (blkif.split_read: at most 11 pages each) with at most BLKTAP_RING_SIZE = 32 in flight, and each
  completed request's slot is copied into the read buffer (blktap's bounce, blkif.py).
Not modelled (it would only make XAPI's way slower): vhd-tool builds its element stream sector by
sector in OCaml/Lwt (4096 elements per 2 MiB block before coalescing).

Usage: python -m hostsim.xapiexport.vhdtool --tapdev-fd N --data-fd D --vhd LEAF.vhd
       [--relative-to BASE.vhd]
       --destination-fd M [--progress] [--parent-pid PID]
Exit status 0 when the whole stream was written, 1 on any failure (message on stderr).
"""

import argparse
import mmap
import os
import socket
import sys

from hostsim.xapiexport import blkif, layout, procutil

XFER_BUFSIZ = 2 << 20


class Tapdev:
    """Reads of the raw device, done as the block layer would over the blktap ring."""

    def __init__(self, sock, data, size):
        self.sock = sock
        self.data = data  # the ring's data pages, shared with tapdisk
        self.size = size
        self._next_id = 1
        self._free = list(range(blkif.BLKTAP_RING_SIZE - 1, -1, -1))
        self._hdr = bytearray(blkif.RSP.size)

    def read_into(self, offset, view):
        """Fill view (page-aligned) with device bytes [offset, offset + len(view))."""
        pending = {}
        todo = blkif.split_read(offset, len(view))
        todo.reverse()
        while todo or pending:
            while todo and self._free:  # a full ring stops the queue until tapdisk answers
                off, n, at = todo.pop()
                slot = self._free.pop()
                rid = self._next_id
                self._next_id += 1
                pending[rid] = (at, n, slot)
                try:
                    self.sock.sendall(
                        blkif.REQ.pack(rid, slot, off // blkif.SECTOR, n // blkif.SECTOR)
                    )
                except (BrokenPipeError, ConnectionResetError):
                    raise blkif.RingError("tapdisk went away (ring closed)") from None
            self._recv_exact(memoryview(self._hdr))
            rid, status = blkif.RSP.unpack(self._hdr)
            req = pending.pop(rid, None)
            if req is None:
                raise blkif.RingError("tapdisk answered request %d, which is not pending" % rid)
            at, n, slot = req
            self._free.append(slot)
            if status != 0:
                raise OSError(
                    -status,
                    "tapdisk failed the read of %d bytes at %d: %s"
                    % (n, offset + at, os.strerror(-status)),
                )
            a, _ = blkif.slot_range(slot)
            view[at : at + n] = self.data[a : a + n]  # blktap_request_bounce: the one copy

    def _recv_exact(self, view):
        while len(view):
            try:
                got = self.sock.recv_into(view)
            except ConnectionResetError:
                got = 0
            if got == 0:
                raise blkif.RingError("tapdisk went away (ring closed)")
            view = view[got:]


def plan(leaf, base=None):
    """(size, blocks) from the VHD metadata: blocks allocated above the base's chain."""
    from agent import vhd

    stop = set()
    if base:
        with vhd.open_chain(base) as b:
            stop = {f.uuid for f in b.files if f.uuid is not None}
    with vhd.open_chain(leaf) as c:
        if c.block_size != layout.BLOCK:
            raise ValueError(
                "%s: block size %d, vhd-tool (hostsim) streams 2 MiB blocks" % (leaf, c.block_size)
            )
        return c.size, layout.blocks_above(c.files, stop, c.block_count)


class Progress:
    """vhd-tool --progress --machine: "%03d" each time the percentage changes."""

    def __init__(self, total, fd):
        self.total, self.fd, self.last = total, fd, -1

    def __call__(self, done):
        if self.fd is None or self.total <= 0:
            return
        pct = done * 100 // self.total
        if pct != self.last and pct <= 100:
            self.last = pct
            try:
                procutil.write_all(self.fd, b"%03d" % pct)
            except OSError:
                self.fd = None  # xapi stopped listening: keep streaming


def stream(tapdev_sock, data, dest_fd, leaf, base=None, progress_fd=None):
    size, blocks = plan(leaf, base)
    prefix, footer, total, bitmap_size = layout.vhd_stream_layout(size, blocks)
    bitmap = b"\xff" * bitmap_size
    dev = Tapdev(tapdev_sock, data, size)
    progress = Progress(total, progress_fd)
    mem = mmap.mmap(-1, XFER_BUFSIZ)  # posix_memalign(pagesize, XFER_BUFSIZ) in direct_copy_stubs.c
    buf = memoryview(mem)
    done = 0
    try:
        procutil.write_all(dest_fd, prefix)
        done += len(prefix)
        progress(done)
        for b in blocks:
            off = b * layout.BLOCK
            n = min(layout.BLOCK, size - off)
            procutil.write_all(dest_fd, bitmap)
            pos = 0
            while pos < layout.BLOCK:  # direct_copy: read up to XFER_BUFSIZ, write it, repeat
                chunk = min(XFER_BUFSIZ, layout.BLOCK - pos)
                avail = max(0, min(chunk, n - pos))
                if avail:
                    dev.read_into(off + pos, buf[:avail])
                if avail < chunk:
                    buf[avail:chunk] = bytes(chunk - avail)  # a partial last block: zeros
                procutil.write_all(dest_fd, buf[:chunk])
                pos += chunk
            done += bitmap_size + layout.BLOCK
            progress(done)
        procutil.write_all(dest_fd, footer)
        progress(total)
    finally:
        buf.release()
        mem.close()
    return total


def main(argv=None):
    p = argparse.ArgumentParser(prog="vhd-tool (hostsim)")
    p.add_argument("--tapdev-fd", type=int, required=True)
    p.add_argument("--data-fd", type=int, required=True)
    p.add_argument("--vhd", required=True)
    p.add_argument("--relative-to")
    p.add_argument("--destination-fd", type=int, required=True)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args(argv)
    procutil.die_with_parent(args.parent_pid)
    sock = socket.socket(fileno=args.tapdev_fd)
    mem = data = None
    try:
        mem = mmap.mmap(args.data_fd, blkif.RING_DATA_BYTES)
        os.close(args.data_fd)
        data = memoryview(mem)
        stream(
            sock,
            data,
            args.destination_fd,
            args.vhd,
            args.relative_to,
            progress_fd=1 if args.progress else None,
        )
    except Exception as e:  # any failure: a non-zero exit, which xapi turns into VDI_IO_ERROR
        procutil.note("vhd-tool", "%s: %s" % (type(e).__name__, e))
        return 1
    finally:
        sock.close()
        if data is not None:
            data.release()
        if mem is not None:
            mem.close()
        try:
            os.close(args.destination_fd)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
