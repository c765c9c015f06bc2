"""QCOW2 format: header, L1/L2 tables, backing chains, read as the agent reads a VHD chain (stdlib
only; runs on dom0's Python 3.6). XCP-ng 8.3 stores disks over 2040 GiB as QCOW2 (SM's
drivers/qcow2util.py: `qemu-img create -f qcow2 [-b <parent> -F qcow2|raw]`, 64 KiB clusters).

Reading (the same calls as agent.vhd, so agent.export.Export serves either):
  open_chain(path, max_depth=64, resolve_backing=None, fd=None, end=None, own_fd=False) -> Chain
      resolve_backing(child, name) -> path | opened level (open_level(...)) | None; default:
      default_resolve_backing (relative names beside the child, absolute ones as they are, then
      by base name beside the child).
  Chain: format 'qcow2', size (leaf's virtual size), block_size (2 MiB, see below), block_count,
         depth, files (leaf first: .path .uuid (from SM's file name, else None) .hidden .kind
         'qcow2'|'raw' .fileno() .size .identity .allocated_blocks() .describe()),
         read(offset, length), read_into(offset, buf), extents(offset=0, length=None) ->
         [Extent(offset, length, zero)], block_source(i) -> BlockSource(kind, file, offset,
         length, pieces) with kind 'zero' | 'file' | 'pieces' | 'assemble', read_block(i),
         read_block_into(i, buf), changed_blocks(base), allocated_blocks(), describe(), close().
  open_level(path, fd=None, end=None, own_fd=False, fmt_name=None) -> Qcow2File | RawLevel.

Block grid: a chain serves 2 MiB blocks whatever its cluster size (512 B to 2 MiB, always a
divisor of 2 MiB), so "one chunk = 2 MiB of the virtual disk, aligned" holds for the orchestrator
exactly as for VHD. A block whose clusters are contiguous in one file is one 'file' source (one
sendfile); one spread over several places or files is 'pieces' (one sendfile per run, holes as
zeros); only compressed clusters (or more than MAX_PIECES runs) make it 'assemble'.

Supported: versions 2 (compat 0.10) and 3, cluster sizes 512 B to 2 MiB, zero clusters, zlib
compressed clusters (inflated on read), raw and QCOW2 backing files (chains as SM makes them),
backing files smaller than their child, internal snapshots (ignored: the active L1 is read),
dirty images (refcounts are never read). Refused with UnsupportedQcow2: encryption, external
data files, extended L2 entries (subclusters), zstd compression, unknown incompatible features,
backing files of another format (a VHD). Refused with CorruptQcow2: the corrupt bit, and any
table, cluster or name outside the file or misaligned. Qcow2ChainError: missing backing file,
loop, depth over max_depth, not an ancestor.
"""

from agent.qcow2.chain import (
    BlockSource,
    Chain,
    Extent,
    default_resolve_backing,
    open_chain,
)
from agent.qcow2.errors import CorruptQcow2, Qcow2ChainError, Qcow2Error, UnsupportedQcow2
from agent.qcow2.file import Qcow2File, RawLevel, open_level
from agent.qcow2.format import MAGIC


def is_qcow2(fd):
    """Whether the open descriptor's first four bytes are the QCOW2 magic."""
    import os

    try:
        return os.pread(fd, 4, 0) == MAGIC
    except OSError:
        return False


__all__ = [
    "BlockSource",
    "Chain",
    "CorruptQcow2",
    "Extent",
    "MAGIC",
    "Qcow2ChainError",
    "Qcow2Error",
    "Qcow2File",
    "RawLevel",
    "UnsupportedQcow2",
    "default_resolve_backing",
    "is_qcow2",
    "open_chain",
    "open_level",
]
