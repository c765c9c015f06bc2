"""Group durability: a backup session's new chunk objects made durable a batch at a time.

On a backend that can stage objects (local directories: ``stage``/``publish``/``discard``, see
backends/local.py), new chunks are written to temporary names without fsync and made durable a
batch at a time (``DURABLE_BATCH`` chunks: parallel fsyncs, renames, one fsync per touched
directory). Other backends (S3, and wrappers that forward unknown attributes, like the tests'
counting or fault-injecting backends) keep a plain durable ``put`` per chunk.

A chunk is counted as stored (and deduplicated against by the session's other disks) once staged,
so a disk's commit first calls :meth:`DurableBatches.flush`, which publishes every chunk the
*session* staged and waits for batches being published by other threads: an index never names a
chunk that is not durable under its final name. A batch that fails fails every later flush of
the session. Used by :class:`orchestrator.repo.writer.BackupSession` (one per session).
"""

from __future__ import annotations

import threading
from typing import Any

from orchestrator.repo.backends import Backend

DURABLE_BATCH = 32  # staged chunks made durable together (64 MiB of 2 MiB chunks)


class DurableBatches:
    """Chunk objects put by the threads of one session; thread-safe."""

    def __init__(self, backend: Backend, batch_size: int = DURABLE_BATCH):
        self.backend = backend
        self.batch_size = batch_size
        # a method of the backend's class (a wrapper forwarding unknown attributes, like the
        # tests' counting or fault-injecting backends, keeps plain puts: they see every put)
        self.enabled = all(
            callable(getattr(type(backend), name, None)) for name in ("stage", "publish", "discard")
        )
        self._staged: list[Any] = []  # staged, not yet durable
        self._publishing = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition(threading.Lock())

    def put(self, key: str, obj: bytes) -> None:
        """Store one chunk object: staged (then published in batches) where the backend can,
        else a plain durable ``put``."""
        backend = self.backend
        if not self.enabled:
            backend.put(key, obj)
            return
        staged = backend.stage(key, obj)
        with self._cond:
            if self._error is not None:
                backend.discard([staged])
                raise self._error
            self._staged.append(staged)
            if len(self._staged) < self.batch_size:
                return
            batch, self._staged = self._staged, []
            self._publishing += 1
        self._publish(batch)

    def _publish(self, batch: list[Any]) -> None:
        try:
            self.backend.publish(batch)
        except BaseException as exc:
            with self._cond:
                if self._error is None:
                    self._error = exc
            raise
        finally:
            with self._cond:
                self._publishing -= 1
                self._cond.notify_all()

    def flush(self) -> None:
        """Publish every staged chunk and wait for batches other threads are publishing;
        raise the error of any batch that failed. After this, every chunk stored so far by any
        disk of the session is durable under its final name."""
        if not self.enabled:
            return
        with self._cond:
            batch, self._staged = self._staged, []
            if batch:
                self._publishing += 1
        if batch:
            self._publish(batch)
        with self._cond:
            while self._publishing:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def discard(self) -> None:
        """Remove the staged chunks that never became durable (an aborted session's)."""
        if not self.enabled:
            return
        with self._cond:
            batch, self._staged = self._staged, []
        if batch:
            self.backend.discard(batch)
