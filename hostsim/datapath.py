"""XAPI's own data paths: GET /export_raw_vdi and PUT /import_raw_vdi, done the XAPI way.

export (format=vhd): like tapdisk + `vhd-tool stream`: the chain is decoded to raw (every block read
through the chain, sector by sector) and re-encoded as a new dynamic VHD, one stream. The blocks sent
are those allocated in the chain (with base=: only in the files of the chain that are not in the base's
chain), as vhd-tool learns from the VHD metadata. format=raw streams the whole virtual disk.

import (format=raw|vhd): a raw image or a dynamic VHD into an existing VDI.
"""

import os
import struct
import tempfile

from agent.vhd import format as fmt
from hostsim import vhdfile
from hostsim.errors import XapiError
from hostsim.server import check_session
from hostsim.store import NULL_REF

BLOCK = 2 << 20


def install(server, pool):
    server.get_routes["/export_raw_vdi"] = lambda h, q: _with_task(pool, export_raw_vdi, h, q)
    server.put_routes["/import_raw_vdi"] = lambda h, q: _with_task(pool, import_raw_vdi, h, q)


def _with_task(pool, fn, handler, query):
    """Run a data path; with task_id= (as XO passes it) the task ends in success or failure."""
    from hostsim.store import xapi_time

    task = query.get("task_id")
    st = pool.api.store
    if task and not st.exists("task", task):
        task = None
    ok = False
    error = ["INTERNAL_ERROR", "the transfer did not complete"]
    try:
        ok = bool(fn(pool, handler, query))
    except XapiError as e:
        error = e.description
        if not handler.wfile.closed:
            _error(handler, 500, " ".join(e.description))
    except OSError as e:
        error = ["INTERNAL_ERROR", "connection: %s" % e]
        raise
    finally:
        if task:
            if ok:
                st.update("task", task, status="success", progress=1.0, finished=xapi_time())
            else:
                st.update("task", task, status="failure", error_info=error, finished=xapi_time())


def _error(handler, code, text):
    body = (text + "\n").encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _find_vdi(api, value):
    st = api.store
    if value.startswith("OpaqueRef:"):
        st.get("VDI", value)
        return value
    return st.by_uuid_ref("VDI", value)


def _authorize(pool, handler, query):
    try:
        check_session(pool.api, query)
    except XapiError:
        _error(handler, 401, "session_id is missing or invalid")
        return None
    try:
        return _find_vdi(pool.api, query.get("vdi", ""))
    except XapiError as e:
        _error(handler, 404, " ".join(e.description))
        return None


def vhd_stream_layout(size, blocks, block_size=BLOCK):
    """(prefix bytes, block -> offset in stream, total length) of a dynamic VHD with these blocks."""
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
    offsets = {}
    for b in blocks:
        bat[b] = pos // 512
        offsets[b] = pos
        pos += bitmap + block_size
    prefix = (
        footer.build()
        + header.build()
        + struct.pack(">%dI" % n, *bat)
        + b"\x00" * (table_bytes - 4 * n)
    )
    return prefix, footer.build(), pos + fmt.FOOTER_SIZE, bitmap


def export_raw_vdi(pool, handler, query):
    vdi = _authorize(pool, handler, query)
    if vdi is None:
        return
    api = pool.api
    rec = api.store.get("VDI", vdi)
    if rec["type"] == "cbt_metadata":
        return _error(handler, 400, "VDI %s has no data (cbt_metadata)" % rec["uuid"])
    sr = api._vdi_backend(vdi)
    uuid = rec["uuid"]
    size = rec["virtual_size"]
    form = query.get("format", "raw")
    if form == "raw":
        if query.get("base"):
            return _error(handler, 400, "base= needs format=vhd")
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        for off in range(0, size, BLOCK):
            handler.wfile.write(sr.read(uuid, off, min(BLOCK, size - off)))
        return True
    if form != "vhd":
        return _error(handler, 400, "unknown format %r" % form)
    stop = ()
    if query.get("base"):
        try:
            base = _find_vdi(api, query["base"])
        except XapiError as e:
            return _error(handler, 404, " ".join(e.description))
        try:
            stop = {vf.uuid for vf in sr.chain(api.store.field("VDI", base, "uuid"))}
        except XapiError as e:
            return _error(handler, 400, "base has no data: " + " ".join(e.description))
    blocks = sr.allocated_blocks(uuid, stop_at=stop)
    prefix, footer, total, bitmap_size = vhd_stream_layout(size, blocks)
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Content-Length", str(total))
    handler.end_headers()
    handler.wfile.write(prefix)
    bitmap = b"\xff" * bitmap_size
    for b in blocks:
        off = b * BLOCK
        n = min(BLOCK, size - off)
        data = sr.read(uuid, off, n)  # decoded to raw through the whole chain ...
        handler.wfile.write(bitmap)  # ... and re-encoded as a full block
        handler.wfile.write(data + bytes(BLOCK - n))
    handler.wfile.write(footer)
    return True


def _read_body(handler, length, sink):
    left = length
    while left:
        chunk = handler.rfile.read(min(left, 1 << 20))
        if not chunk:
            raise OSError("client closed the upload with %d bytes left" % left)
        sink(chunk)
        left -= len(chunk)


def import_raw_vdi(pool, handler, query):
    vdi = _authorize(pool, handler, query)
    if vdi is None:
        return
    api = pool.api
    rec = api.store.get("VDI", vdi)
    if api._active_vbds(vdi):
        return _error(handler, 409, "VDI_IN_USE %s import_raw_vdi" % vdi)
    if "Content-Length" not in handler.headers:
        return _error(handler, 411, "Content-Length required")
    length = int(handler.headers["Content-Length"])
    sr = api._vdi_backend(vdi)
    uuid = rec["uuid"]
    size = rec["virtual_size"]
    form = query.get("format", "raw")
    try:
        if form == "raw":
            if length > size:
                return _error(
                    handler, 400, "image of %d bytes is larger than the VDI (%d)" % (length, size)
                )
            _import_raw(handler, sr, uuid, length)
        elif form == "vhd":
            _import_vhd(handler, sr, uuid, length, size)
        else:
            return _error(handler, 400, "unknown format %r" % form)
    except XapiError as e:
        return _error(handler, 500, " ".join(e.description))
    except (vhdfile.VhdFileError, ValueError) as e:
        return _error(handler, 400, str(e))
    api.refresh_vdi(vdi)
    handler.send_response(200)
    handler.send_header("Content-Length", "0")
    handler.end_headers()
    return True


def _import_raw(handler, sr, uuid, length):
    allocated = set(sr.allocated_blocks(uuid))
    buf = bytearray()
    off = 0

    def flush(data):
        nonlocal off
        block = off // BLOCK
        padded = bytes(data) + bytes((-len(data)) % 512)
        if any(padded) or block in allocated:
            sr.write(uuid, off, padded)
        off += len(data)

    def sink(chunk):
        buf.extend(chunk)
        while len(buf) >= BLOCK:
            flush(buf[:BLOCK])
            del buf[:BLOCK]

    _read_body(handler, length, sink)
    if buf:
        flush(buf)


def _import_vhd(handler, sr, uuid, length, size):
    fd, tmp = tempfile.mkstemp(prefix=".import-", suffix=".vhd", dir=sr.path)
    try:
        with os.fdopen(fd, "wb") as f:
            _read_body(handler, length, f.write)
        with vhdfile.VhdFile(tmp) as src:
            if src.parent_uuid is not None:
                raise ValueError("a differencing VHD cannot be imported")
            from agent import speedups

            for index in src.allocated():
                nsec = min(src.spb, (src.size - index * src.block_size + 511) // 512)
                for start, run, is_set in speedups.bitmap_runs(src.bitmap(index), 0, nsec):
                    if not is_set:
                        continue
                    off = index * src.block_size + start * 512
                    data = src.read_sectors(index, start, run)
                    if off + len(data) > size:
                        # qemu-img rounds sizes up to a CHS geometry: only zeros may lie beyond the VDI.
                        if any(data[max(0, size - off) :]):
                            raise ValueError("the VHD has data beyond the VDI's %d bytes" % size)
                        data = data[: max(0, size - off)]
                    if data:
                        sr.write(uuid, off, data)
    finally:
        os.unlink(tmp)


__all__ = ["NULL_REF", "export_raw_vdi", "import_raw_vdi", "install", "vhd_stream_layout"]
