"""Write a chain out locally: raw (sparse when the target is a regular file) or a VHD stream."""

import os
import stat

from agent import speedups
from agent.vhd.writer import stream_vhd

CHUNK = 4 << 20


def _open_out(out):
    """(fd, close_it) for a path, '-' (stdout) or a binary file object."""
    if out == "-":
        return 1, False
    if isinstance(out, str):
        return os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), True
    out.flush()
    return out.fileno(), False


def _write_all(fd, data):
    view = memoryview(data)
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def export_raw(chain, out, sparse=True):
    """Write the guest-visible disk as a raw image. Holes stay holes when `out` is a regular file."""
    fd, close_it = _open_out(out)
    try:
        st = os.fstat(fd)
        seekable = stat.S_ISREG(st.st_mode)
        sparse = sparse and seekable
        if seekable:
            start = os.lseek(fd, 0, os.SEEK_CUR)
            if sparse:
                os.ftruncate(fd, start)  # holes are skipped, so old bytes there must not survive
        buf = bytearray(CHUNK)
        zeros = bytes(CHUNK)
        pos = 0
        for ext in chain.extents():
            end = ext.offset + ext.length
            while pos < end:
                n = min(CHUNK, end - pos)
                if ext.zero:
                    if sparse:
                        os.lseek(fd, n, os.SEEK_CUR)
                    else:
                        _write_all(fd, memoryview(zeros)[:n])
                else:
                    view = memoryview(buf)[:n]
                    chain.read_into(pos, view)
                    if sparse and speedups.is_zero(view):
                        os.lseek(fd, n, os.SEEK_CUR)
                    else:
                        _write_all(fd, view)
                pos += n
        if seekable:
            os.ftruncate(fd, start + chain.size)
    finally:
        if close_it:
            os.close(fd)
    return chain.size


def export_vhd(chain, out, base=None, uuid=None):
    """Write the chain as one dynamic VHD, or (base given) as a differencing VHD of the changed blocks.

    The differencing VHD's parent is the base chain's leaf (uuid, and './<leaf file name>' locators).
    Returns the number of bytes written.
    """
    if base is None:
        blocks = chain.allocated_blocks()
        parent = None
    else:
        blocks = chain.changed_blocks(base)
        leaf = base.files[0]
        parent = (leaf.uuid, os.path.basename(leaf.path))
    stream = stream_vhd(
        chain.size, blocks, chain.read_block, block_size=chain.block_size, uuid=uuid, parent=parent
    )
    fd, close_it = _open_out(out)
    try:
        for piece in stream:
            _write_all(fd, piece)
    finally:
        if close_it:
            os.close(fd)
    return stream.total_length
