"""Disk image formats: tell VHD from QCOW2 by content, open the right chain.

Both readers (agent.vhd, agent.qcow2) answer the same chain protocol, which is all that
agent.export, agent.http and the CLI use of a chain:

  size, block_size (2 MiB for every QCOW2 chain), block_count, depth, path, files (leaf first;
  each with path, uuid (or None), size, block_size, fileno(), allocated_blocks(), describe()),
  read(offset, length), read_into(offset, buf), extents(offset=0, length=None) -> [Extent(offset,
  length, zero)], block_source(i) -> (kind, file, offset, length[, pieces]) with kind 'zero' |
  'file' | 'assemble' | 'pieces' (QCOW2 only: `pieces` is ((level or None, file offset, length),
  ...) covering the block in order, None meaning zeros), read_block(i), read_block_into(i, buf),
  changed_blocks(base), allocated_blocks(), describe(), close(); a QCOW2 chain also has
  format = 'qcow2' (a VHD chain has no `format`: FORMAT_VHD is assumed).

The format is decided by the leaf's first bytes (QCOW2 magic `QFI\\xfb`, else VHD, which may also be
a plain raw file when allow_raw), never by the file name; callers that know what SM named the file
check that name and content agree (agent.sr).
"""

import os

FORMAT_VHD = "vhd"
FORMAT_QCOW2 = "qcow2"


def image_errors():
    """The exception classes of both readers, for `except image_errors() as exc`:
    (VhdError, Qcow2Error)."""
    from agent.qcow2 import Qcow2Error
    from agent.vhd import VhdError

    return (VhdError, Qcow2Error)


def chain_format(chain):
    return getattr(chain, "format", FORMAT_VHD)


def detect(path=None, fd=None):
    """FORMAT_QCOW2 or FORMAT_VHD from the first bytes of fd (or of the file at path).
    An unreadable or empty file says FORMAT_VHD: the VHD reader then gives the typed error."""
    from agent.qcow2 import MAGIC

    try:
        if fd is not None:
            head = os.pread(fd, 4, 0)
        else:
            from agent.vhd.file import open_readonly

            f = open_readonly(path)
            try:
                head = os.pread(f, 4, 0)
            finally:
                os.close(f)
    except OSError:
        return FORMAT_VHD
    return FORMAT_QCOW2 if head == MAGIC else FORMAT_VHD


def open_chain(
    path,
    max_depth=64,
    resolve_parent=None,
    resolve_backing=None,
    allow_raw=True,
    fd=None,
    end=None,
    fmt=None,
):
    """The chain whose leaf is `path` (or fd), in whichever format its content is (or `fmt`,
    already detected). resolve_parent goes to agent.vhd.open_chain, resolve_backing to
    agent.qcow2.open_chain."""
    kind = fmt or detect(path, fd)
    if kind == FORMAT_QCOW2:
        from agent import qcow2

        return qcow2.open_chain(
            path, max_depth=max_depth, resolve_backing=resolve_backing, fd=fd, end=end
        )
    from agent import vhd

    return vhd.open_chain(
        path,
        max_depth=max_depth,
        resolve_parent=resolve_parent,
        allow_raw=allow_raw,
        fd=fd,
        end=end,
    )
