"""VHD format: structures, checksums, chain reader, writers (stdlib only; runs on dom0's Python 3.6).

Reading (other parts of the agent code against exactly these names):
  open_chain(path, max_depth=64, resolve_parent=None, raw_parent=None, allow_raw=True, fd=None,
             end=None) -> Chain (a context manager holding one fd per file for its life)
      resolve_parent(child, locators) -> path | opened level (VhdFile/RawFile) | None, where locators
      is [(platform code "W2ku"/"W2ru"/"MacX", decoded path)]; default: relative to the child's
      directory, then absolute, then the parent's unicode name beside the child.
      raw_parent: the raw file to use under a differencing disk whose parent uuid is null (LVM LV-).
  Chain: size (leaf current_size), block_size (leaf's; 2 MiB for fixed/raw), block_count, depth,
         files (leaf first: .path .uuid .hidden .parent_uuid .fileno() .footer .header .block_size
         .size; a RawFile has uuid/footer/header None),
         read(offset, length) -> bytes (ValueError past the end), read_into(offset, buf),
         extents(offset=0, length=None) -> [Extent(offset, length, zero)] (zero: no file has the
         sectors; sector granularity, merged), block_source(i) -> BlockSource(kind, file, offset,
         length) with kind 'zero' | 'file' (the guest block is bytes [offset, offset+length) of
         file.fileno(): sendfile-able) | 'assemble' (use read_block(i)), read_block(i) -> bytes,
         read_block_into(i, buf) -> length (fills buf[:length]; no allocation),
         changed_blocks(base) -> sorted block indices allocated above the common ancestor `base` (a
         Chain or a path; ChainError if it is not an ancestor), allocated_blocks(), describe().
  VhdFile.open(path, fd=None, end=None, own_fd=False), RawFile.open(...): one level; with fd and end
         a VHD inside a larger device (footer in the 512 bytes before `end`).

Writing:
  create_dynamic(path, size, block_size=2 MiB, uuid=None, max_table_entries=None) -> VhdWriter
  create_differencing(path, parent_path, uuid=None, size=None, block_size=None) -> VhdWriter
      VhdWriter.write(offset, data), close() (also a context manager). Creator 'tap', exact size,
      footer copy at 0, batmap, 4 KiB-aligned data areas, W2ku/W2ru './name' + MacX absolute locators.
  VhdStreamLayout(size, block_indices, block_size, uuid=None, parent=None): total_length,
      prefix_bytes(), blocks, block_offset(i), bitmap_bytes(i), data_offset(i), gap, footer_offset,
      suffix_bytes(), chunks(read_block); parent=(uuid or None, name[, timestamp]) for a
      differencing stream. stream_vhd(...) -> VhdStream (iterable, .total_length, .layout).
  export_raw(chain, path | fileobj | "-", sparse=True), export_vhd(chain, out, base=None)

Errors: VhdError (.path, .field) > CorruptVhd, UnsupportedVhd (v_poison, encrypted, QCOW2, > 2040
GiB, unknown type), ChainError (missing/wrong parent, loop, depth, not an ancestor).

Modules: format (on-disk structures, checksums), file (one level: VhdFile, RawFile), parents
(finding and checking a parent), resolve (which level supplies each sector: SectorMap), chain
(open_chain, Chain's reads and block questions), writer (VhdWriter, VHD streams), convert (export),
errors.
"""

from agent.vhd.chain import BlockSource, Chain, Extent, open_chain
from agent.vhd.convert import export_raw, export_vhd
from agent.vhd.errors import ChainError, CorruptVhd, UnsupportedVhd, VhdError
from agent.vhd.file import RawFile, VhdFile, open_level
from agent.vhd.parents import default_resolve_parent
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
