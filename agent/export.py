"""An Export: what the NBD and HTTP servers serve for one ticket.

It wraps an open chain (agent.vhd.Chain or agent.qcow2.Chain: the chain protocol of agent.image;
the chain holds every file open for the export's life) and an optional base chain, and answers:

- size, block_size
- extents(offset, length): runs of data / hole (base:allocation)
- changed(offset, length): runs with a changed flag at block granularity, relative to the base
  (with no base, changed == allocated)
- iter_extents / iter_changed: the same runs as a generator over bounded windows (windowed_runs),
  so an answer for a whole, badly fragmented disk never sits in memory at once
- plan_read(offset, length): how to send a read, as pieces the server can put on the wire:
    ('sendfile', fd, file_offset, n)  bytes [file_offset, +n) of one chain file (os.sendfile-able)
    ('bytes', data)                   assembled in memory (block split across the chain)
    ('hole', n)                       n zero bytes (unallocated everywhere in the chain)
  from each block's source: 'zero', 'file' (one sendfile), 'pieces' (a QCOW2 block whose clusters
  lie in several places: one sendfile per run, zeros as holes) or 'assemble' (bytes).

Counters (bytes and pieces sent by each method) are kept in a Counters object shared with the
server, which records what it actually did (sendfile, or pread when TLS forbids sendfile).

Consistency (docs/consistency.md): the chain's files stay open and their metadata is read once; a
ChainGuard checks, before every plan_read and by check() (the servers call it after sending a
request's data), that no file of the chain was deleted, replaced, renamed, resized or modified
since the export opened. Once a change is seen the export fails for good with ChainChanged (an
ExportError): the NBD server answers EIO, the HTTP server ends the stream.
"""

import os
import stat
import threading

SENDFILE = "sendfile"
BYTES = "bytes"
HOLE = "hole"

DATA = "data"
ZERO = "zero"  # allocated but known to read as zeroes (reported as data today)


class ExportError(Exception):
    """An export cannot serve a request (bad range, broken chain)."""


class ChainChanged(ExportError):
    """A file of the chain changed under the export (names the file and what changed)."""


_FOOTER = 512
_HEADER = 1024
_SOURCES_WEIGHT = 1 << 16  # cached block sources, each weighing 1 + its pieces


class _LevelState(object):
    """What a level looked like when the export opened it."""

    def __init__(self, level):
        self.level = level
        self.path = level.path
        fd = level.fileno()
        st = os.fstat(fd)
        self.regular = stat.S_ISREG(st.st_mode)
        self.ident = (st.st_dev, st.st_ino, st.st_rdev)
        self.size = st.st_size
        self.mtime = st.st_mtime_ns
        self.meta = []  # (offset, bytes): metadata re-read on a block device (mtime says nothing)
        regions = getattr(level, "guard_regions", None)
        if not self.regular and regions is not None:
            # a level that names its own metadata (QCOW2: header, L1 table)
            for off, length in regions():
                self.meta.append((off, os.pread(fd, length, off)))
        elif not self.regular and getattr(level, "is_vhd", False) and level.footer is not None:
            where = getattr(level, "footer_at", None)
            end = getattr(level, "end", None)
            if where == "end":
                off = end - _FOOTER
            elif where == "short":
                off = end - (_FOOTER - 1)
            else:
                off = 0
            self.meta.append((off, os.pread(fd, _FOOTER, off)))
            if level.header is not None:
                hoff = level.footer.data_offset
                self.meta.append((hoff, os.pread(fd, _HEADER, hoff)))

    def problem(self):
        """None, or what changed."""
        fd = self.level.fileno()
        if fd < 0:
            return "closed"
        try:
            st = os.fstat(fd)
        except OSError as exc:  # ESTALE: deleted on the NFS server by another host
            return "cannot stat it any more (%s)" % exc.strerror
        if self.regular:
            if st.st_nlink == 0:
                return "deleted"
            if st.st_size != self.size:
                return "size changed from %d to %d bytes" % (self.size, st.st_size)
            if st.st_mtime_ns != self.mtime:
                return "modified (mtime changed)"
        # A rename alone (SM's snapshot renames the leaf it snapshots) leaves the bytes we read
        # alone, so paths are not compared: deletion, growth and writes are what matter.
        for off, data in self.meta:
            try:
                now = os.pread(fd, len(data), off)
            except OSError as exc:
                return "cannot read its metadata any more (%s)" % exc.strerror
            if now != data:
                return "its metadata at offset %d changed" % off
        return None


class ChainGuard(object):
    """Detects a chain that changed under an export; sticky once it fired."""

    def __init__(self, chain):
        self.states = [_LevelState(f) for f in chain.files]
        self.leaf = chain.files[0].path if chain.files else "?"
        self.failed = None
        self.checks = 0

    def check(self):
        if self.failed is not None:
            raise ChainChanged(self.failed)
        self.checks += 1
        for st in self.states:
            what = st.problem()
            if what is not None:
                self.failed = (
                    "the chain of %s changed under the export: %s: %s; "
                    "the export is closed (open a new one)" % (self.leaf, st.path, what)
                )
                raise ChainChanged(self.failed)


class Counters(object):
    """Thread-safe counters: pieces and bytes per send method, plus named gauges."""

    METHODS = ("sendfile", "pread", "assembled", "hole")

    def __init__(self):
        self._lock = threading.Lock()
        self._values = {}
        for m in self.METHODS:
            self._values["%s_pieces" % m] = 0
            self._values["%s_bytes" % m] = 0

    def record(self, method, nbytes, pieces=1):
        with self._lock:
            self._values["%s_pieces" % method] = self._values.get("%s_pieces" % method, 0) + pieces
            self._values["%s_bytes" % method] = self._values.get("%s_bytes" % method, 0) + nbytes

    def add(self, name, delta=1):
        with self._lock:
            self._values[name] = self._values.get(name, 0) + delta

    def snapshot(self):
        with self._lock:
            return dict(self._values)


def _merge_runs(runs):
    """Merge adjacent (offset, length, value) runs with equal values."""
    out = []
    for off, length, value in runs:
        if length <= 0:
            continue
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        else:
            out.append((off, length, value))
    return out


# windowed_runs: first window, and the bounds it adapts between (a window holds at most
# window / 512 runs, so MAX_WINDOW bounds the memory of one step: 64 K runs for 32 MiB).
MIN_WINDOW = 2 << 20
MAX_WINDOW = 32 << 20


def windowed_runs(fetch, offset, length, min_window=MIN_WINDOW, max_window=MAX_WINDOW):
    """Yield fetch's runs over [offset, offset + length), merged, one window at a time.

    fetch(offset, length) returns [(start, length, *values)] covering its range; runs with equal
    values that touch are merged, also across windows. The window doubles (up to max_window) while
    the disk is unfragmented and falls back to min_window when a window is busy, so a sparse 2 TiB
    disk takes few calls and a sector-fragmented one never holds more than one window's runs.
    Windows end on min_window boundaries (block aligned for the default)."""
    end = offset + length
    pos = offset
    window = min_window
    pending = None
    while pos < end:
        stop = min(end, (pos // min_window) * min_window + window)
        if stop <= pos:
            stop = min(end, pos + window)
        runs = fetch(pos, stop - pos)
        for run in runs:
            if run[1] <= 0:
                continue
            if pending is not None and pending[2:] == run[2:] and pending[0] + pending[1] == run[0]:
                pending = (pending[0], pending[1] + run[1]) + tuple(run[2:])
                continue
            if pending is not None:
                yield pending
            pending = tuple(run)
        window = min(max_window, window * 2) if len(runs) < 64 else min_window
        pos = stop
    if pending is not None:
        yield pending


def _add_sendfile(pieces, fd, foff, n):
    last = pieces[-1] if pieces else None
    if last and last[0] == SENDFILE and last[1] == fd and last[2] + last[3] == foff:
        pieces[-1] = (SENDFILE, fd, last[2], last[3] + n)
    else:
        pieces.append((SENDFILE, fd, foff, n))


def _add_hole(pieces, n):
    if pieces and pieces[-1][0] == HOLE:
        pieces[-1] = (HOLE, pieces[-1][1] + n)
    else:
        pieces.append((HOLE, n))


def _add_block_pieces(pieces, src, within, n, index):
    """The part [within, within + n) of a 'pieces' block source, as sendfile and hole pieces."""
    pos = 0
    stop = within + n
    for level, foff, length in src.pieces:
        a, b = max(pos, within), min(pos + length, stop)
        if a < b:
            if level is None:
                _add_hole(pieces, b - a)
            else:
                _add_sendfile(pieces, level.fileno(), foff + (a - pos), b - a)
        pos += length
        if pos >= stop:
            return
    raise ExportError("block %d source covers %d bytes, need %d" % (index, pos, stop))


class Export(object):
    """Serve one chain (+ optional base). Thread-safe for concurrent reads."""

    def __init__(self, chain, base_chain=None, counters=None, name=None, guard=None, on_close=()):
        """guard: True (a ChainGuard over `chain`), a guard object with check(), or None.
        on_close: callables run once by close() after the chains are closed (lock holds, LV
        activations)."""
        self.chain = chain
        self.base_chain = base_chain
        self.name = name
        self.size = chain.size
        self.block_size = chain.block_size
        self.block_count = chain.block_count
        self.counters = counters if counters is not None else Counters()
        # Chain reads are positional (pread/preadv) and a VhdFile's bitmap cache has its own lock,
        # so reads run in parallel; this lock only guards the lazy changed-block map.
        self._lock = threading.Lock()
        self._sources = {}
        self._sources_weight = 0  # entries plus the pieces they hold (bounds the cache's memory)
        self._changed = None  # bytearray, one byte per block: 1 = changed
        self._on_close = list(on_close)
        self._closed = False
        self.guard = ChainGuard(chain) if guard is True else guard

    # -- lifetime ------------------------------------------------------------------------------

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            for c in (self.chain, self.base_chain):
                if c is not None:
                    c.close()
        finally:
            callbacks, self._on_close = self._on_close, []
            for cb in reversed(callbacks):
                try:
                    cb()
                except Exception:  # a release failing must not hide the others
                    import logging

                    logging.getLogger("fastpath.export").exception("export close: %r", cb)

    def check(self):
        """Raise ChainChanged if the chain changed since the export opened (cheap: a few stat
        calls per file). The servers call it after sending a request's data, so data that left
        before a change is followed by an error rather than accepted."""
        if self.guard is not None:
            self.guard.check()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def description(self):
        files = getattr(self.chain, "files", ())
        return "%s chain of %d file(s), %d blocks of %d bytes%s" % (
            getattr(self.chain, "format", "vhd").upper(),
            len(files),
            self.block_count,
            self.block_size,
            ", relative to a base" if self.base_chain is not None else "",
        )

    # -- checks --------------------------------------------------------------------------------

    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ExportError(
                "range [%d, +%d) outside the export (%d bytes)" % (offset, length, self.size)
            )

    def _source(self, index):
        src = self._sources.get(index)
        if src is None:
            src = self.chain.block_source(index)
            weight = 1 + len(getattr(src, "pieces", None) or ())
            if self._sources_weight + weight > _SOURCES_WEIGHT:
                self._sources.clear()
                self._sources_weight = 0
            self._sources[index] = src
            self._sources_weight += weight
        return src

    # -- metadata --------------------------------------------------------------------------------

    def extents(self, offset=0, length=None):
        """[(offset, length, DATA|HOLE)] covering [offset, offset+length), merged."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        if length == 0:
            return []
        raw = self.chain.extents(offset, length)
        runs = []
        for e in raw:
            start = max(e.offset, offset)
            end = min(e.offset + e.length, offset + length)
            if end > start:
                runs.append((start, end - start, HOLE if e.zero else DATA))
        return _merge_runs(runs)

    def iter_extents(self, offset=0, length=None):
        """extents() as a generator over bounded windows (see windowed_runs)."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        return windowed_runs(self.extents, offset, length)

    def iter_changed(self, offset=0, length=None):
        """changed() as a generator over bounded windows (see windowed_runs)."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        return windowed_runs(self.changed, offset, length)

    def _changed_map(self):
        if self._changed is None:
            with self._lock:
                if self._changed is None:
                    changed = bytearray(self.block_count)
                    if self.base_chain is None:
                        # Allocated blocks: the union of the files' BATs (metadata only; a
                        # 2 TiB disk is not scanned sector by sector).
                        for f in self.chain.files:
                            self._mark_blocks(changed, f.block_size, f.allocated_blocks())
                    else:
                        for i in self.chain.changed_blocks(self.base_chain):
                            changed[i] = 1
                    self._changed = changed
        return self._changed

    def _mark_blocks(self, changed, file_block_size, blocks):
        bs = self.block_size
        count = self.block_count
        if file_block_size == bs:
            for b in blocks:
                if b < count:
                    changed[b] = 1
            return
        for b in blocks:
            first = b * file_block_size // bs
            last = min(((b + 1) * file_block_size - 1) // bs, count - 1)
            for i in range(first, last + 1):
                changed[i] = 1

    def changed(self, offset=0, length=None):
        """[(offset, length, bool)] at block granularity (clipped to the range), merged."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        if length == 0:
            return []
        cmap = self._changed_map()
        bs = self.block_size
        runs = []
        end = offset + length
        pos = offset
        while pos < end:
            i = pos // bs
            nxt = min((i + 1) * bs, end)
            runs.append((pos, nxt - pos, bool(cmap[i])))
            pos = nxt
        return _merge_runs(runs)

    def changed_blocks(self):
        return [i for i, v in enumerate(self._changed_map()) if v]

    # -- reads -----------------------------------------------------------------------------------

    def plan_read(self, offset, length):
        """Pieces covering [offset, offset+length) in order (see module docstring)."""
        self._check_range(offset, length)
        bs = self.block_size
        pieces = []
        pos = offset
        end = offset + length
        while pos < end:
            i = pos // bs
            block_start = i * bs
            n = min(block_start + bs, end) - pos
            src = self._source(i)
            if src.kind == "zero":
                _add_hole(pieces, n)
            elif src.kind == "file":
                within = pos - block_start
                if within + n > src.length:
                    raise ExportError(
                        "block %d source in %s is %d bytes, need %d"
                        % (i, getattr(src.file, "path", "?"), src.length, within + n)
                    )
                fd = src.file.fileno()
                foff = src.offset + within
                _add_sendfile(pieces, fd, foff, n)
            elif src.kind == "pieces":
                _add_block_pieces(pieces, src, pos - block_start, n, i)
            else:
                if n == bs and pos == block_start:
                    data = self.chain.read_block(i)
                else:
                    data = self.chain.read(pos, n)
                if len(data) != n:
                    raise ExportError("block %d assembled to %d bytes, need %d" % (i, len(data), n))
                pieces.append((BYTES, data))
            pos += n
        if self.guard is not None and any(p[0] != HOLE for p in pieces):
            # Holes come from the metadata read at open; file data is checked (assembled bytes
            # were read before this check; sendfile pieces are checked again by the server).
            self.check()
        return pieces

    def read(self, offset, length):
        """The bytes of [offset, offset+length) (for tests and the HTTP server)."""
        import os

        out = []
        from_files = False
        for piece in self.plan_read(offset, length):
            if piece[0] == HOLE:
                out.append(b"\0" * piece[1])
                continue
            from_files = True
            if piece[0] == BYTES:
                out.append(piece[1])
            else:
                _, fd, foff, n = piece
                data = os.pread(fd, n, foff)
                if len(data) != n:
                    raise ExportError("short read at file offset %d" % foff)
                out.append(data)
        if from_files:
            self.check()  # the bytes above were read before this: no change had happened yet
        return b"".join(out)
