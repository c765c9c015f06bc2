"""Replacing a local file atomically: what readers see is the old file or the new one, whole.

The data goes to a temporary file beside the target (created exclusively, mode 0600 from the
start, so a private file is never readable by others even for a moment), is fsync()ed, given its
final mode and renamed over the target; with ``sync_dir`` the directory is fsync()ed too, so the
rename survives a power loss. Used by the job report sinks, the client-side repository pins and
exported key files.
"""

from __future__ import annotations

import os
import tempfile


def write_atomically(path: str, data: bytes, mode: int = 0o644, sync_dir: bool = False) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastpath-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        try:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
