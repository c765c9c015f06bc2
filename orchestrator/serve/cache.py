"""A bounded cache of decoded chunks, with single-flight fetches and read-ahead.

:class:`ChunkCache` knows nothing of NBD or of repositories: it is given ``fetch(i) -> bytes``
(chunk ``i`` of one disk, verified and decoded) and an executor. ``get(i)`` returns chunk ``i``
from the cache, or waits for the fetch already in flight for it (two readers of one chunk cost
one GET), or fetches it. ``read_ahead(last)`` schedules the next ``prefetch`` chunks after
``last`` when the readers look sequential (:meth:`note_read`: a read that starts where an
earlier read ended), so an ``nbdcopy`` or ``qemu-img convert`` finds its next chunks decoded.

Memory: at most ``capacity`` bytes of cached chunks (least recently used go first), plus the
chunks being fetched (at most ``prefetch`` read-ahead fetches, plus one per request chunk being
read). Zero chunks are never fetched nor cached (the export serves them as holes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future

RECENT_ENDS = 64  # read ends remembered for the sequential test (several parallel readers)


class ChunkCache:
    def __init__(
        self,
        fetch: Callable[[int], bytes],
        executor: Executor,
        *,
        capacity: int,
        prefetch: int = 4,
        count: int,
        skip: Callable[[int], bool] = lambda i: False,
    ):
        self._fetch = fetch
        self._executor = executor
        self.capacity = max(0, capacity)
        self.prefetch = max(0, prefetch)
        self.count = count
        self._skip = skip  # chunks never fetched (zero chunks)
        self._lock = threading.Lock()
        self._data: OrderedDict[int, bytes] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[int, Future] = {}
        self._ahead = 0  # read-ahead fetches in flight
        self._ends: OrderedDict[int, None] = OrderedDict()  # next chunk of recent reads
        self.stats = {"hits": 0, "misses": 0, "waits": 0, "prefetched": 0, "fetched": 0}

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __contains__(self, i: int) -> bool:
        with self._lock:
            return i in self._data

    def get(self, i: int) -> bytes:
        with self._lock:
            data = self._data.get(i)
            if data is not None:
                self._data.move_to_end(i)
                self.stats["hits"] += 1
                return data
            fut = self._inflight.get(i)
            if fut is None:
                self.stats["misses"] += 1
                fut = self._inflight[i] = Future()
                owner = True
            else:
                self.stats["waits"] += 1
                owner = False
        if not owner:
            return fut.result()
        return self._load(i, fut)

    def _load(self, i: int, fut: Future) -> bytes:
        try:
            data = self._fetch(i)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(i, None)
            fut.set_exception(exc)
            raise
        with self._lock:
            self._inflight.pop(i, None)
            self.stats["fetched"] += 1
            self._store(i, data)
        fut.set_result(data)
        return data

    def _store(self, i: int, data: bytes) -> None:
        # under self._lock
        if len(data) > self.capacity:
            return
        old = self._data.pop(i, None)
        if old is not None:
            self._bytes -= len(old)
        self._data[i] = data
        self._bytes += len(data)
        while self._bytes > self.capacity and self._data:
            _, dropped = self._data.popitem(last=False)
            self._bytes -= len(dropped)

    # -- read-ahead ----------------------------------------------------------------------------

    def note_read(self, first: int, last: int) -> bool:
        """Record a read of chunks [first, last]; True when it continues an earlier read (the
        reader is sequential and read-ahead is worth it)."""
        with self._lock:
            sequential = first in self._ends or (first - 1) in self._ends
            self._ends.pop(first, None)
            self._ends[last + 1] = None
            self._ends.move_to_end(last + 1)
            while len(self._ends) > RECENT_ENDS:
                self._ends.popitem(last=False)
        return sequential

    def read_ahead(self, last: int) -> int:
        """Schedule fetches of up to ``prefetch`` chunks after ``last`` (skipping cached, in
        flight and zero chunks); returns how many were scheduled."""
        scheduled = 0
        i = last + 1
        end = min(self.count, last + 1 + self.prefetch)
        while i < end:
            with self._lock:
                if self._ahead >= self.prefetch:
                    break
                todo = not (i in self._data or i in self._inflight or self._skip(i))
                if todo:
                    fut = Future()
                    self._inflight[i] = fut
                    self._ahead += 1
                    self.stats["prefetched"] += 1
            if todo:
                try:
                    self._executor.submit(self._ahead_one, i, fut)
                except RuntimeError:  # executor shut down: the export is closing
                    with self._lock:
                        self._inflight.pop(i, None)
                        self._ahead -= 1
                    fut.cancel()
                    break
                scheduled += 1
            i += 1
        return scheduled

    def _ahead_one(self, i: int, fut: Future) -> None:
        try:
            self._load(i, fut)
        except BaseException:
            pass  # a reader that needs the chunk fetches it again and sees the error
        finally:
            with self._lock:
                self._ahead -= 1
