"""XAPI's own data paths: GET /export_raw_vdi and PUT /import_raw_vdi, done the XAPI way.

export (format=vhd) comes in two models, chosen per pool (`set_export_model`, `hostsim serve
--export-model`; DEFAULT_EXPORT_MODEL when unset):
- "processes" (default): the architecture of a real host, in separate processes: a tapdisk that opens
  the VHD chain (O_DIRECT) and serves raw sectors over a blktap-like ring, a vhd-tool that takes the
  blocks from the VHD metadata, reads them from tapdisk and writes the VHD stream, and (over HTTPS) the
  stunnel hop. See hostsim/xapiexport/ for each modelled fact and its source.
- "inline": one function in the XAPI process decodes the chain (page-cached reads) and re-encodes it.
A QCOW2 VDI is always exported inline (decoded through qemu, re-encoded as VHD). Both send the same
bytes: the blocks allocated in the chain (with base=: only in the files of the chain
that are not in the base's chain), as vhd-tool learns from the VHD metadata, in the layout of
hostsim/xapiexport/layout.py. format=raw streams the whole virtual disk (inline in both models).

import (format=raw|vhd): a raw image or a dynamic VHD into an existing VDI.
"""

import os
import socket
import tempfile

from hostsim import vhdfile
from hostsim.errors import XapiError
from hostsim.server import check_session
from hostsim.store import NULL_REF
from hostsim.xapiexport.layout import BLOCK, vhd_stream_layout

EXPORT_MODELS = ("processes", "inline")
DEFAULT_EXPORT_MODEL = "processes"


def set_export_model(pool, model):
    """Choose how this pool's export_raw_vdi?format=vhd runs: "processes" or "inline"."""
    if model not in EXPORT_MODELS:
        raise ValueError("unknown export model %r (one of %s)" % (model, ", ".join(EXPORT_MODELS)))
    pool.export_model = model


def export_model(pool):
    return getattr(pool, "export_model", None) or DEFAULT_EXPORT_MODEL


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
        if getattr(e, "headers_sent", False):
            _end_connection(handler)  # the client has a 200 and part of a body: cut it short
        elif not handler.wfile.closed:
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


def _end_connection(handler):
    handler.close_connection = True
    try:
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


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
    base_uuid = None
    if query.get("base"):
        try:
            base = _find_vdi(api, query["base"])
        except XapiError as e:
            return _error(handler, 404, " ".join(e.description))
        try:
            base_uuid = api.store.field("VDI", base, "uuid")
            stop = {vf.uuid for vf in sr.chain(base_uuid)}
        except XapiError as e:
            return _error(handler, 400, "base has no data: " + " ".join(e.description))
    blocks = sr.allocated_blocks(uuid, stop_at=stop)
    prefix, footer, total, bitmap_size = vhd_stream_layout(size, blocks)
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Content-Length", str(total))
    handler.end_headers()
    if export_model(pool) == "processes" and sr.image_format_of(uuid) == "vhd":
        # (a QCOW2 VDI: no tapdisk/vhd-tool model of it; decoded and re-encoded inline below)
        _export_processes(pool, handler, query, sr, uuid, base_uuid)
        return True
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


def _export_processes(pool, handler, query, sr, uuid, base_uuid):
    """tapdisk + vhd-tool (+ the stunnel hop over HTTPS), after the 200 headers, as xapi does
    (vhd-tool gets the base VDI's VHD as --relative-to and reads its chain's metadata itself)."""
    from hostsim.xapiexport.pipeline import ExportFailed, Pipeline

    base = sr.vhd_path(base_uuid) if base_uuid else None
    task = query.get("task_id")
    st = pool.api.store

    def progress(pct):
        if task and st.exists("task", task):
            st.update("task", task, progress=min(pct, 100) / 100.0)

    try:
        Pipeline(sr.vhd_path(uuid), base).run(handler.connection, progress)
    except (ExportFailed, OSError) as e:
        err = XapiError("VDI_IO_ERROR", "Device I/O errors", str(e))
        err.headers_sent = True
        raise err from e


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


__all__ = [
    "DEFAULT_EXPORT_MODEL",
    "EXPORT_MODELS",
    "NULL_REF",
    "export_model",
    "export_raw_vdi",
    "import_raw_vdi",
    "install",
    "set_export_model",
    "vhd_stream_layout",
]
