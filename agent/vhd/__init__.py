"""VHD format: structures, checksums, chain reader, writers (stdlib only; runs on dom0's Python 3.6).

Public API (other parts of the agent code against exactly these names):
  open_chain(path, max_depth=64, resolve_parent=None) -> Chain
  Chain: size, block_size, block_count, files, depth, read, read_into, extents, block_source,
         read_block, changed_blocks
  Extent(offset, length, zero), BlockSource(kind, file, offset, length)
  VhdFile.open(path, fd=None, end=None), RawFile.open(path, fd=None, end=None)
  create_dynamic, create_differencing, stream_vhd, VhdStreamLayout, export_raw, export_vhd
  VhdError > CorruptVhd, UnsupportedVhd, ChainError
"""

from agent.vhd.chain import BlockSource, Chain, Extent, default_resolve_parent, open_chain
from agent.vhd.convert import export_raw, export_vhd
from agent.vhd.errors import ChainError, CorruptVhd, UnsupportedVhd, VhdError
from agent.vhd.file import RawFile, VhdFile, open_level
from agent.vhd.writer import (
    VhdStream,
    VhdStreamLayout,
    VhdWriter,
    create_differencing,
    create_dynamic,
    stream_vhd,
)

__all__ = [
    "BlockSource",
    "Chain",
    "ChainError",
    "CorruptVhd",
    "Extent",
    "RawFile",
    "UnsupportedVhd",
    "VhdError",
    "VhdFile",
    "VhdStream",
    "VhdStreamLayout",
    "VhdWriter",
    "create_differencing",
    "create_dynamic",
    "default_resolve_parent",
    "export_raw",
    "export_vhd",
    "open_chain",
    "open_level",
    "stream_vhd",
]
