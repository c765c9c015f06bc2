"""The VHD stream that hostsim's export_raw_vdi?format=vhd sends (both export models), and its blocks.

Layout (kept byte-identical to what hostsim has always sent, so clients see no difference between the
"inline" and "processes" models): footer copy, dynamic header, BAT right after the header, then for
each exported block a sector bitmap with every bit set and the 2 MiB of data (a partial last block is
padded with zeros), then the footer. Real vhd-tool (mirage/ocaml-vhd `lib/f.ml`, Vhd_input.vhd_common)
writes the same elements in the same order (footer, header, BAT, per block `Sectors bitmap` with all
bits set + the block's sectors, footer) with two differences hostsim does not copy: it leaves one empty
sector before the BAT (table_offset 2048, not 1536), and with a base (`--relative-to`) it writes a
differencing disk whose parent is the base. Neither changes the cost of the transfer.
"""

import struct

from agent.vhd import format as fmt

BLOCK = 2 << 20


def vhd_stream_layout(size, blocks, block_size=BLOCK):
    """(prefix bytes, footer bytes, total length, bitmap size) of a dynamic VHD with these blocks."""
    n = (size + block_size - 1) // block_size
    footer = fmt.Footer(
        data_offset=fmt.FOOTER_SIZE,
        original_size=size,
        current_size=size,
        disk_type=fmt.DISK_DYNAMIC,
    )
    footer.cylinders, footer.heads, footer.sectors_per_track = fmt.chs_geometry(size)
    table_offset = fmt.FOOTER_SIZE + fmt.HEADER_SIZE
    table_bytes = fmt.sectors_padded(n * 4)
    header = fmt.Header(table_offset=table_offset, max_table_entries=n, block_size=block_size)
    bitmap = fmt.bitmap_bytes(block_size)
    pos = table_offset + table_bytes
    bat = [fmt.BAT_UNUSED] * n
    for b in blocks:
        bat[b] = pos // 512
        pos += bitmap + block_size
    prefix = (
        footer.build()
        + header.build()
        + struct.pack(">%dI" % n, *bat)
        + b"\x00" * (table_bytes - 4 * n)
    )
    return prefix, footer.build(), pos + fmt.FOOTER_SIZE, bitmap


def blocks_above(files, stop_uuids, block_count):
    """Blocks allocated in the chain's files (leaf first) above the first file whose uuid is in
    stop_uuids: what export_raw_vdi sends (with base=, the files of the base's chain are left out; for
    a base that is an ancestor this equals vhd-tool's `include_block` with `from`, the BAT union of the
    files in one branch and not the other, mirage/ocaml-vhd `lib/f.ml`)."""
    found = set()
    for f in files:
        if f.uuid in stop_uuids:
            break
        found.update(b for b in f.allocated_blocks() if b < block_count)
    return sorted(found)
