"""The views: what each resource of the HTTP API answers, one function per resource.

health, metrics, info and extents answer JSON (or Prometheus text); raw, blocks and vhd stream
the disk.

A view is a function of a routing.Handler `h`: h.req is the request (protocol.Request), h.resp the
response to fill (response.Response), and for the /v1/exports/<ticket>/... resources h.ticket is the
checked ticket and h.view its export as an exportview.ExportView (routing.py opens both first; the
table EXPORT_VIEWS there says which path runs which view). A view decides the status, the headers
and which bytes to send; Response moves them. Streams (raw, blocks, vhd) call h.check_live() before
the head and between blocks, and hold back their last bytes (the footer, the end frame, the last
byte) until a final check, so a chain that changes or a ticket revoked during a transfer ends in a
truncated body the client detects, never in mixed data. The blocks framing is
protocol.BlocksEncoder.
"""

from agent.http import protocol as hp
from agent.http.gate import ticket_attr

STREAM_TYPE = "application/octet-stream"


def health(h):
    """GET /healthz."""
    h.resp.send_json({"status": "ok"})


def metrics(h):
    """GET /metrics: the server's counters in Prometheus text, with the daemon's extra text."""
    text = h.server.metrics.render(h.server.metrics_extra).encode("utf-8")
    h.resp.transport = "metrics"
    h.resp.start(
        200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], len(text), text
    )


def info(h):
    v = h.view
    allocated = v.allocated_blocks()
    info = {
        "ticket": ticket_attr(h.ticket, "id", None),
        "vdi": v.vdi,
        "size": v.size,
        "block_size": v.block_size,
        "block_count": v.block_count,
        "chain": list(v.chain_uuids),
        "depth": len(v.chain_uuids),
        "base": None,
        "allocation": {
            "allocated_blocks": len(allocated),
            "allocated_bytes": sum(v.block_length(i) for i in allocated),
        },
        "transports": ["raw", "vhd", "blocks"],
        "expires": ticket_attr(h.ticket, "expires", None),
    }
    if v.base_vdi is not None or v.base_uuids:
        changed = v.changed_blocks()
        info["base"] = {
            "vdi": v.base_vdi,
            "chain": list(v.base_uuids),
            "changed_blocks": len(changed),
            "changed_bytes": sum(v.block_length(i) for i in changed),
        }
    h.resp.send_json(info)


def _offset_length(h, size):
    start = _int_param(h.req, "start", 0)
    length = _int_param(h.req, "length", size - start if start <= size else 0)
    if start > size or start + length > size:
        raise hp.RequestError(
            "start/length past the end of the disk (%d bytes)" % size,
            status=416,
            code="range_not_satisfiable",
            headers=[("Content-Range", "bytes */%d" % size)],
        )
    return start, length


def extents(h):
    """GET /v1/exports/<ticket>/extents: a JSON array of runs, streamed (send_json_stream) from
    generators over bounded windows, so its memory does not grow with the disk's fragmentation."""
    v = h.view
    context = h.req.param("context", "allocation")
    start, length = _offset_length(h, v.size)
    granularity = h.req.param("granularity", "sector")
    if granularity not in ("sector", "block"):
        raise hp.RequestError("granularity must be sector or block", code="bad_parameter")
    if context == "allocation" and granularity == "block":
        # Whole blocks from the BATs: cheap on any disk size, what a block-level copier needs.
        allocated = set(v.allocated_blocks())
        runs = (
            {"start": s0, "length": n, "zero": not alloc, "hole": not alloc}
            for s0, n, alloc in _block_runs(start, length, v.block_size, allocated)
        )
    elif context == "allocation":
        runs = (
            {"start": s, "length": n, "zero": bool(z), "hole": bool(hole)}
            for s, n, z, hole in v.iter_extents(start, length)
        )
    elif context in ("changed", "dirty"):
        if v.base_vdi is None and not v.base_uuids:
            raise hp.RequestError(
                "this ticket has no base: no changed blocks to report",
                status=400,
                code="no_base",
            )
        runs = (
            {"start": s, "length": n, "changed": bool(c), "dirty": bool(c)}
            for s, n, c in v.iter_changed_extents(start, length)
        )
    else:
        raise hp.RequestError(
            "unknown extents context %r (allocation or changed)" % context[:32],
            code="bad_context",
        )
    h.resp.send_json_stream(runs)


def raw(h):
    v = h.view
    rng = hp.parse_range(h.req.header("range"), v.size)
    resp = h.resp
    resp.transport = "raw"
    headers = [("Content-Type", STREAM_TYPE), ("Accept-Ranges", "bytes")]
    if rng is None:
        start, end = 0, v.size
        status = 200
    else:
        start, end = rng
        status = 206
        headers.append(("Content-Range", "bytes %d-%d/%d" % (start, end - 1, v.size)))
    h.check_live()  # a chain already changed gets a JSON error, not a short body
    resp.start(status, headers, end - start)
    if resp.head_only:
        return
    # The ticket and the chain are checked between blocks; the last byte is held back until
    # a final check, so a chain that changed while the data left ends in a short body.
    step = v.block_size
    pos = start
    last = end - 1
    while pos < last:
        h.check_live()
        n = min(step - pos % step, last - pos)
        resp.write_pieces(v.read_pieces(pos, n), h.record)
        pos += n
    if end > start:
        h.check_live()
        resp.write_pieces(v.read_pieces(last, 1), h.record)


def _block_range(h):
    v = h.view
    first = _int_param(h.req, "start", 0)
    count = _int_param(h.req, "count", max(0, v.block_count - first))
    if first > v.block_count or first + count > v.block_count:
        raise hp.RequestError(
            "block range [%d, +%d) outside the disk's %d blocks" % (first, count, v.block_count),
            status=416,
            code="range_not_satisfiable",
        )
    return first, count


def _pad_to(h, pos, target):
    if target < pos:
        raise hp.HttpError("VHD layout goes backwards at %d (stream at %d)" % (target, pos))
    h.resp.write_zeros(target - pos)
    return target


def _wants_changed(h):
    flag = h.req.param("changed")
    has_base = h.view.base_vdi is not None or bool(h.view.base_uuids)
    if flag is None:
        return has_base
    if flag not in ("0", "1", "true", "false"):
        raise hp.RequestError("changed must be 0 or 1", code="bad_parameter")
    changed = flag in ("1", "true")
    if changed and not has_base:
        raise hp.RequestError("changed=1 needs a ticket with a base", status=400, code="no_base")
    return changed


def blocks(h):
    v = h.view
    first, count = _block_range(h)
    changed = _wants_changed(h)
    chosen = v.changed_blocks() if changed else v.allocated_blocks()
    chosen = [i for i in chosen if first <= i < first + count]
    # A changed block that no file of the chain holds any more reads as zeros: a ZERO frame.
    holes = set(chosen) - set(v.allocated_blocks()) if changed else set()
    plans = [(i, 0 if i in holes else v.block_length(i)) for i in chosen]
    enc = hp.BlocksEncoder(v.size, v.block_size, first, count, changed=changed)
    length = hp.BlocksEncoder.stream_length(n for _, n in plans)
    h.check_live()
    resp = h.resp
    resp.transport = "blocks"
    resp.start(
        200,
        [
            ("Content-Type", "application/x-fastpath-blocks"),
            ("X-Fastpath-Frames", len(plans)),
        ],
        length,
    )
    if resp.head_only:
        return
    resp.write(enc.stream_header())
    metrics = h.server.metrics
    for i, n in plans:
        h.check_live()
        if i in holes:
            resp.write(enc.frame(i, 0, zero=True))
            metrics.add("blocks", "zero")
            continue
        pieces = v.block_pieces(i)
        resp.write(enc.frame(i, n))
        _count_block(metrics, pieces, h.conn.tls)
        resp.write_pieces(pieces, h.record)
    h.check_live()  # a chain change during the last block: no end frame, the client knows
    resp.write(enc.end())


def vhd(h):
    v = h.view
    changed = _wants_changed(h)
    if v.size % 512:
        raise hp.RequestError(
            "a disk of %d bytes (not a multiple of 512) cannot be a VHD stream: use raw or blocks"
            % v.size,
            status=409,
            code="not_vhd_streamable",
        )
    chosen = v.changed_blocks() if changed else v.allocated_blocks()
    try:
        layout = v.vhd_layout(chosen, delta=changed)
    except ValueError as exc:  # the VHD format's own bounds (size, block size)
        raise hp.RequestError(
            "this disk cannot be a VHD stream: %s" % exc, status=409, code="not_vhd_streamable"
        ) from None
    resp = h.resp
    resp.transport = "vhd"
    name = "%s%s.vhd" % (v.vdi or "disk", "-delta" if changed else "")
    h.check_live()
    resp.start(
        200,
        [
            ("Content-Type", "application/x-vhd"),
            ("Content-Disposition", 'attachment; filename="%s"' % name),
        ],
        layout.total_length,
    )
    if resp.head_only:
        return
    # Follow the layout's own offsets (it may pad between areas to keep data 4 KiB-aligned).
    prefix = layout.prefix_bytes()
    resp.write(prefix)
    pos = len(prefix)
    metrics = h.server.metrics
    bs = v.block_size
    for i in layout.blocks:
        h.check_live()
        pos = _pad_to(h, pos, layout.block_offset(i))
        bitmap = layout.bitmap_bytes(i)
        resp.write(bitmap)
        pos = _pad_to(h, pos + len(bitmap), layout.data_offset(i))
        pieces = v.block_pieces(i)
        _count_block(metrics, pieces, h.conn.tls)
        resp.write_pieces(pieces, h.record)
        pos += bs  # with the zeros below for the last block of a disk not block-aligned
        short = bs - v.block_length(i)
        if short:
            resp.write_zeros(short)
    _pad_to(h, pos, layout.total_length - len(layout.suffix_bytes()))
    h.check_live()  # the footer only follows data read from an unchanged chain
    resp.write(layout.suffix_bytes())


def _block_runs(offset, length, block_size, members):
    """(start, length, in members) at block granularity over [offset, offset + length), merged,
    as a generator (one run in memory)."""
    end = offset + length
    pos = offset
    run = None
    while pos < end:
        i = pos // block_size
        nxt = min(end, (i + 1) * block_size)
        flag = i in members
        if run is not None and run[2] == flag:
            run = (run[0], run[1] + nxt - pos, flag)
        else:
            if run is not None:
                yield run
            run = (pos, nxt - pos, flag)
        pos = nxt
    if run is not None:
        yield run


def _count_block(metrics, pieces, tls):
    kinds = {p[0] for p in pieces}
    if kinds == {"file"} and len(pieces) == 1:
        metrics.add("blocks", "pread" if tls else "sendfile")
    elif kinds == {"zero"}:
        metrics.add("blocks", "zero")
    else:
        metrics.add("blocks", "assembled")


def _int_param(req, name, default):
    value = req.param(name)
    if value is None:
        return default
    if not value.isdigit() or len(value) > 19:
        raise hp.RequestError("%s must be a non-negative integer" % name, code="bad_parameter")
    return int(value)
