"""What the HTTP views need from an export: ExportView, and RealExportView over agent.export.Export.

routing.Handler opens the ticket's export with the server's exports_opener and wraps it with
export_view(); views.py then only speaks ExportView: the disk's size and block size, allocated and
changed blocks, extents, read pieces (("file", fd, offset, length) for sendfile / pread, ("bytes",
data), ("zero", length)) that response.Response.write_pieces() sends, the VHD layout of a vhd
stream (agent.vhd.writer), and check() between blocks (the chain must not change under a stream).
Tests give the server their own ExportView (tests/http/test_views.py) instead of a real export.
"""

import os

from agent.export import windowed_runs
from agent.http.gate import ticket_attr


class ExportView(object):
    """What the HTTP handlers need from an export; see export_view() for the adapter.

    Block-level pieces are tuples: ("file", fd, offset, length) to send with sendfile/pread,
    ("bytes", data) already in memory, ("zero", length) zeros.
    """

    size = 0
    block_size = 2 << 20
    vdi = None
    base_vdi = None
    chain_uuids = ()
    base_uuids = ()

    @property
    def block_count(self):
        return (self.size + self.block_size - 1) // self.block_size

    def block_length(self, index):
        return min(self.block_size, self.size - index * self.block_size)

    def allocated_blocks(self):
        raise NotImplementedError

    def changed_blocks(self):
        raise NotImplementedError

    def block_pieces(self, index):
        raise NotImplementedError

    def read_pieces(self, offset, length):
        raise NotImplementedError

    def extents(self, offset, length):
        """[(start, length, zero, hole)] covering [offset, offset + length)."""
        raise NotImplementedError

    def iter_extents(self, offset, length):
        """extents() as a generator over bounded windows (agent.export.windowed_runs)."""
        return windowed_runs(self.extents, offset, length)

    def iter_changed_extents(self, offset, length):
        """changed_extents() as a generator over bounded windows."""
        return windowed_runs(self.changed_extents, offset, length)

    def changed_extents(self, offset, length):
        """[(start, length, changed)] covering [offset, offset + length)."""
        out = []
        changed = set(self.changed_blocks())
        bs = self.block_size
        end = offset + length
        pos = offset
        while pos < end:
            i = pos // bs
            nxt = min(end, (i + 1) * bs)
            flag = i in changed
            if out and out[-1][2] == flag and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + nxt - pos, flag)
            else:
                out.append((pos, nxt - pos, flag))
            pos = nxt
        return out

    def vhd_layout(self, block_indexes, delta=False):
        """An addressable VHD stream layout holding these blocks; with delta=True a differencing
        disk whose parent is the ticket's base. Needs: total_length, block_indexes, prefix_bytes(),
        bitmap_bytes(i), suffix_bytes()."""
        raise NotImplementedError

    def check(self):
        """Raise if the export can no longer be served consistently (e.g. chain changed)."""

    def close(self):
        pass


def export_view(export, ticket=None):
    """Adapt the object returned by exports_opener to ExportView (identity when it already is one)."""
    if isinstance(export, ExportView):
        return export
    return RealExportView(export, ticket)


class RealExportView(ExportView):
    """ExportView over agent.export.Export (plan_read pieces, extents, changed, counters)."""

    def __init__(self, export, ticket=None):
        self.export = export
        self.size = export.size
        self.block_size = export.block_size
        self.vdi = ticket_attr(ticket, "vdi", None)
        self.base_vdi = ticket_attr(ticket, "base", None)
        chain = getattr(export, "chain", None)
        base = getattr(export, "base_chain", None)
        self.chain_uuids = tuple(_uuid_str(f) for f in getattr(chain, "files", ()))
        self.base_uuids = tuple(_uuid_str(f) for f in getattr(base, "files", ()))
        if base is None:
            self.base_vdi = None
        self._allocated = None

    def allocated_blocks(self):
        """Blocks some file of the chain holds: from the BATs (metadata only, as the NBD server
        does), or from the export's extents when a level cannot say."""
        if self._allocated is None:
            export = self.export
            if getattr(export, "base_chain", None) is None and hasattr(export, "changed_blocks"):
                self._allocated = list(export.changed_blocks())  # no base: changed == allocated
            else:
                self._allocated = self._bat_union()
        return self._allocated

    def _bat_union(self):
        bs = self.block_size
        count = self.block_count
        blocks = set()
        try:
            for f in self.export.chain.files:
                fbs = f.block_size
                for b in f.allocated_blocks():
                    first = b * fbs // bs
                    last = min(((b + 1) * fbs - 1) // bs, count - 1)
                    blocks.update(range(first, last + 1))
        except AttributeError:
            blocks = set()
            for start, length, kind in self.export.extents(0, self.size):
                if kind == "hole" or length <= 0:
                    continue
                blocks.update(range(start // bs, (start + length - 1) // bs + 1))
        return sorted(b for b in blocks if b < count)

    def changed_blocks(self):
        return self.export.changed_blocks()

    def changed_extents(self, offset, length):
        return self.export.changed(offset, length)

    def extents(self, offset, length):
        return [
            (s, n, k in ("hole", "zero"), k == "hole")
            for s, n, k in self.export.extents(offset, length)
        ]

    def read_pieces(self, offset, length):
        out = []
        for piece in self.export.plan_read(offset, length):
            kind = piece[0]
            if kind == "sendfile":
                out.append(("file", piece[1], piece[2], piece[3]))
            elif kind == "bytes":
                out.append(("bytes", piece[1]))
            elif kind == "hole":
                out.append(("zero", piece[1]))
            else:
                raise ValueError("unknown read piece %r" % (kind,))
        return out

    def block_pieces(self, index):
        start = index * self.block_size
        return self.read_pieces(start, self.block_length(index))

    def record(self, method, nbytes):
        counters = getattr(self.export, "counters", None)
        if counters is not None:
            counters.record(method, nbytes)

    def vhd_layout(self, block_indexes, delta=False):
        from agent.vhd import writer

        chain = self.export.chain
        parent = None
        if delta:
            base = self.export.base_chain
            leaf = base.files[0]
            name = "%s.vhd" % self.base_vdi if self.base_vdi else os.path.basename(leaf.path)
            parent = (leaf.uuid, name)
        return writer.VhdStreamLayout(
            self.size, block_indexes, self.block_size, uuid=chain.files[0].uuid, parent=parent
        )

    def check(self):
        check = getattr(self.export, "check", None)
        if check is not None:
            check()


def _uuid_str(level):
    u = getattr(level, "uuid", None)
    return str(u) if u is not None else None
