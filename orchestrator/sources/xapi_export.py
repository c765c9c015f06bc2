"""XAPI's legacy export: ``GET /export_raw_vdi?vdi=…&format=vhd[&base=…]``, parsed as it streams.

The stream is a dynamic VHD written front to back (footer copy, header, BAT, then the blocks in
file order, then the footer), as vhd-tool produces it; with ``base=`` it holds only the blocks
that changed since the base. It is parsed with ``agent.vhd``'s structures, never written to disk:
one stream, one reader (that is XAPI's way; the point of comparison for the fast path).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from urllib.parse import urlencode, urlparse

from agent.vhd import format as fmt
from orchestrator.lazy import speedups
from orchestrator.sources import httpclient
from orchestrator.sources.base import DiskPlan, Source, SourceError


class _Stream:
    def __init__(self, resp, what: str):
        self.resp = resp
        self.pos = 0
        self.what = what

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.resp.read(n - len(out))
            if not data:
                raise SourceError(f"{self.what}: stream ended at byte {self.pos + len(out)}")
            out += data
        self.pos += n
        return bytes(out)

    def skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise SourceError(f"{self.what}: block at {offset} goes backwards (at {self.pos})")
        while self.pos < offset:
            self.read(min(1 << 20, offset - self.pos))


class XapiExportSource(Source):
    name = "xapi-export"
    reads_any_block = False  # one stream of the blocks it carries, in file order

    def __init__(
        self,
        xapi_url: str,
        session_ref: str,
        vdi_uuid: str,
        *,
        base_uuid: str | None = None,
        cafile: str | None = None,
        max_in_flight: int = 8,
    ):
        super().__init__(max_in_flight=max_in_flight)
        self.xapi_url = xapi_url.rstrip("/")
        self.session_ref = session_ref
        self.vdi = vdi_uuid
        self.base = base_uuid
        self.cafile = cafile
        self._conn = None
        self._stream: _Stream | None = None
        self._offsets: dict[int, int] = {}
        self._bitmap_size = 0
        self._vhd_block = 0

    def describe(self) -> str:
        return f"XAPI export_raw_vdi {urlparse(self.xapi_url).netloc}"

    def open(self, blocks: Sequence[int] | None = None) -> DiskPlan:
        if blocks is not None:
            raise SourceError("xapi-export cannot read a given block list (it streams a VHD)")
        query = {"session_id": self.session_ref, "vdi": self.vdi, "format": "vhd"}
        if self.base:
            query["base"] = self.base
        path = "/export_raw_vdi?" + urlencode(query)
        self._conn, resp = httpclient.get(self.xapi_url, path, cafile=self.cafile, timeout=300)
        st = self._stream = _Stream(resp, f"export_raw_vdi of {self.vdi}")
        footer = fmt.Footer.parse(st.read(fmt.FOOTER_SIZE))
        if footer.cookie != fmt.FOOTER_COOKIE or footer.disk_type != fmt.DISK_DYNAMIC:
            raise SourceError(f"{st.what}: not a dynamic VHD stream")
        st.skip_to(footer.data_offset)
        header = fmt.Header.parse(st.read(fmt.HEADER_SIZE))
        if header.cookie != fmt.HEADER_COOKIE:
            raise SourceError(f"{st.what}: bad dynamic header")
        st.skip_to(header.table_offset)
        n = header.max_table_entries
        bat = struct.unpack(f">{n}I", st.read(4 * n))
        size = footer.current_size
        self._vhd_block = header.block_size
        self._bitmap_size = fmt.bitmap_bytes(header.block_size)
        count = -(-size // header.block_size)
        self._offsets = {b: off * 512 for b, off in enumerate(bat[:count]) if off != fmt.BAT_UNUSED}
        todo = sorted(self._offsets)
        self.plan = DiskPlan(size, header.block_size, todo, self.base is not None, self.name)
        return self.plan

    def _workers(self, blocks):
        order = sorted(blocks, key=lambda b: self._offsets[b])

        def run(emit):
            st = self._stream
            bs = self._vhd_block
            for b in order:
                st.skip_to(self._offsets[b])
                bitmap = st.read(self._bitmap_size)
                data = st.read(bs)
                n = self.plan.block_length(b)
                nsec = -(-n // 512)
                if speedups.bitmap_count(bitmap, 0, nsec) != nsec:
                    if self.base is not None:
                        raise SourceError(f"{st.what}: block {b} is partial in a delta stream")
                    buf = bytearray(data)
                    for start, run_, is_set in speedups.bitmap_runs(bitmap, 0, nsec):
                        if not is_set:
                            buf[start * 512 : (start + run_) * 512] = bytes(run_ * 512)
                    data = bytes(buf)
                emit(b, data[:n])

        return [run]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
