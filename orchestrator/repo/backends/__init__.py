"""Storage backends of a repository: a local directory or a prefix of an S3 bucket.

``open_backend(url)`` picks one from the URL: ``s3://bucket[/prefix]`` or a filesystem path
(``file://`` accepted).
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.repo.backends.base import Backend, ObjectInfo, check_key, check_prefix

__all__ = ["Backend", "ObjectInfo", "check_key", "check_prefix", "open_backend", "is_s3_url"]


S3_ONLY_OPTIONS = (
    "endpoint_url",
    "region",
    "addressing",
    "retry",
    "connect_timeout",
    "read_timeout",
    "check_bucket",
    "conditional_writes",
    "session",
)


def is_s3_url(url: str) -> bool:
    return str(url).startswith("s3://")


def open_backend(url: str | os.PathLike[str], *, concurrency: int = 16, **options: Any) -> Backend:
    """Open the backend for ``url``.

    S3 options (keyword, all optional): ``endpoint_url``, ``region``, ``addressing`` ("path" or
    "virtual"), ``retry`` (a :class:`~orchestrator.repo.retry.RetryPolicy`), ``connect_timeout``,
    ``read_timeout``, ``check_bucket`` (default True: a missing bucket or bad credentials fail at
    once). Local options: ``create`` (default False: the first write makes the directories).
    """
    text = os.fspath(url)
    if is_s3_url(text):
        from orchestrator.repo.backends.s3 import S3Backend

        return S3Backend(text, concurrency=concurrency, **options)
    if text.startswith("file://"):
        text = text[len("file://") :]
    from orchestrator.repo.backends.local import LocalBackend

    # Options that only mean something for S3 are accepted and ignored, so callers can pass the
    # same options whatever the URL.
    for name in S3_ONLY_OPTIONS:
        options.pop(name, None)
    return LocalBackend(text, **options)
