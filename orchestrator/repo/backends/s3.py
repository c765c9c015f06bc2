"""S3 backend (boto3): a repository under ``s3://bucket/prefix``.

Configuration comes from the standard AWS chain (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``), so any
S3-compatible provider works unchanged. Specific to this backend:

- ``FASTPATH_S3_ADDRESSING=path|virtual`` (default: path when a custom endpoint is configured,
  else virtual-hosted as AWS prefers).
- ``FASTPATH_S3_CONDITIONAL_WRITES=auto|off``: ``put_if_absent`` uses ``If-None-Match: *``. Before
  the first one, a probe object is written twice (the second write must be refused) and deleted:
  a provider that refuses the header (501) or silently ignores it makes the backend fall back to
  HEAD-then-PUT (racy) from then on; ``off`` forces that fallback.
- Checksums only when an operation requires them (``when_required``): some providers reject the
  ``x-amz-checksum-*`` headers that botocore sends by default since 1.36.
- boto3's own retries are off; every call goes through one :class:`RetryPolicy`, and the body of
  a GET is read inside it (see ``orchestrator/repo/retry.py``).
- A batch delete a provider refuses (MalformedXML, MissingContentMD5, NotImplemented...) makes the
  backend delete one object at a time from then on.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from orchestrator.repo.backends.base import Backend, ObjectInfo, check_key, check_prefix
from orchestrator.repo.errors import NotFound, PermanentBackendError, RepoError
from orchestrator.repo.retry import RetryPolicy, TruncatedBody

log = logging.getLogger(__name__)

ADDRESSING_ENV = "FASTPATH_S3_ADDRESSING"
CONDITIONAL_ENV = "FASTPATH_S3_CONDITIONAL_WRITES"
DELETE_BATCH = 1000
PROBE_PREFIX = "probes/conditional-write-"  # a top-level name no repository job lists
# Answers to a batch delete that mean "this provider does not do batch deletes like that".
BATCH_DELETE_UNSUPPORTED = {
    "MalformedXML",
    "MissingContentMD5",
    "NotImplemented",
    "InvalidRequest",
    "InvalidDigest",
    "BadDigest",
    "InvalidArgument",
    "XAmzContentSHA256Mismatch",
}


class ObjectVanished(Exception):
    """A create-only write was refused (412) but the object is gone when read back: retried."""


class _Unsupported(RepoError):
    """Internal: the provider does not support a request form (passes through the policy)."""


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def parse_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 URL (s3://bucket/prefix): {url!r}")
    if parsed.query or parsed.fragment or parsed.params:
        raise ValueError(f"S3 URL must not have a query or fragment: {url!r}")
    prefix = parsed.path.strip("/")
    if prefix:
        check_key(prefix)
    return parsed.netloc, prefix


def _is_aws_endpoint(endpoint: str | None) -> bool:
    host = urlparse(endpoint or "").hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


class S3Backend(Backend):
    list_page_size = 1000  # keys per ListObjectsV2 page (tests lower it to exercise paging)
    delete_batch_size = DELETE_BATCH  # keys per DeleteObjects (tests lower it)

    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 16,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing: str | None = None,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        check_bucket: bool = True,
        conditional_writes: str | None = None,
        session: boto3.session.Session | None = None,
    ):
        self.bucket, prefix = parse_s3_url(url)
        self._prefix = f"{prefix}/" if prefix else ""
        self.url = f"s3://{self.bucket}/{prefix}".rstrip("/")
        self.retry = retry or RetryPolicy.from_env()
        session = session or boto3.session.Session()
        region = region or session.region_name or "us-east-1"
        addressing = addressing or os.environ.get(ADDRESSING_ENV) or None
        if addressing not in (None, "path", "virtual"):
            raise ValueError(f"{ADDRESSING_ENV} must be 'path' or 'virtual', not {addressing!r}")

        def make_client(style: str) -> Any:
            config = Config(
                region_name=region,
                signature_version="s3v4",
                s3={"addressing_style": style},
                retries={"mode": "standard", "total_max_attempts": 1},
                max_pool_connections=max(10, concurrency + 4),
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                tcp_keepalive=True,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            return session.client("s3", endpoint_url=endpoint_url, config=config)

        try:
            if addressing is None and (
                endpoint_url
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
            ):
                addressing = "path"
            client = make_client(addressing or "auto")
            if addressing is None:  # endpoint from a profile, or AWS itself
                addressing = "virtual" if _is_aws_endpoint(client.meta.endpoint_url) else "path"
                if addressing == "path":
                    client.close()
                    client = make_client(addressing)
        except Exception as exc:
            raise PermanentBackendError(f"cannot configure S3 for {self.url}: {exc}") from exc
        self.addressing = addressing
        self.endpoint_url = client.meta.endpoint_url
        self._client = client
        mode = conditional_writes or os.environ.get(CONDITIONAL_ENV, "auto")
        if mode not in ("auto", "off"):
            raise ValueError(f"{CONDITIONAL_ENV} must be 'auto' or 'off', not {mode!r}")
        self._conditional_put: bool | None = None if mode == "auto" else False
        self._batch_delete = True
        self._flag_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        if check_bucket:
            self._check_bucket()

    # -- helpers -----------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._prefix}{key}"

    def _call(self, fn: Any, *, op: str, key: str = "") -> Any:
        return self.retry.call(fn, op=op, key=self._where(key) if key else self.url)

    def _check_bucket(self) -> None:
        """Fail fast (PermanentBackendError) on a missing bucket or bad credentials. A listing
        rather than a HEAD, so the error carries its code (a HEAD 403 has no body)."""
        self._call(
            lambda: self._client.list_objects_v2(
                Bucket=self.bucket, Prefix=self._prefix, MaxKeys=1
            ),
            op="ListObjectsV2",
        )

    def _get_full(self, full: str, display: str) -> bytes:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if _status(exc) == 404 and _code(exc) in ("NoSuchKey", "404", ""):
                raise NotFound(f"no object {display}") from None
            raise
        body = resp["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        length = resp.get("ContentLength")
        if length is not None and len(data) != length:
            raise TruncatedBody(f"got {len(data)} of {length} bytes")
        return data

    # -- contract ----------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        full, where = self._full(key), self._where(key)
        return self._call(lambda: self._get_full(full, where), op="GetObject", key=key)

    def put(self, key: str, data: bytes) -> None:
        full = self._full(key)
        body = bytes(data)
        self._call(
            lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=body),
            op="PutObject",
            key=key,
        )

    def put_if_absent(self, key: str, data: bytes) -> bool:
        full, where = self._full(key), self._where(key)
        body = bytes(data)
        if self._conditional_put is None:
            self._probe_conditional_writes()
        if self._conditional_put:
            attempts = 0

            def attempt() -> bool:
                nonlocal attempts
                attempts += 1
                try:
                    self._client.put_object(
                        Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*"
                    )
                    return True
                except ClientError as exc:
                    status, code = _status(exc), _code(exc)
                    if status == 412 or code == "PreconditionFailed":
                        if attempts == 1:
                            return False
                        # An earlier attempt may have created it and lost the answer.
                        try:
                            return self._get_full(full, where) == body
                        except NotFound:
                            raise ObjectVanished("412, then no object; retrying") from None
                    if status == 501 or code == "NotImplemented":
                        raise _Unsupported(f"conditional PUT not supported at {self.url}") from None
                    raise

            try:
                created = self._call(attempt, op="PutObjectIfAbsent", key=key)
            except _Unsupported:
                with self._flag_lock:
                    self._conditional_put = False
            else:
                return created
        # Fallback for providers without conditional writes: HEAD then PUT (racy).
        if self.exists(key):
            return False
        self.put(key, body)
        return True

    def _probe_conditional_writes(self) -> None:
        """Once per backend: does the provider honour ``If-None-Match: *``? Some refuse it (501:
        fall back), and some silently ignore it, which would make every create-only write
        succeed — so write a probe object twice and expect the second write to be refused."""
        with self._probe_lock:
            if self._conditional_put is not None:
                return
            probe = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
            full = self._full(probe)

            def create() -> bool:
                try:
                    self._client.put_object(
                        Bucket=self.bucket, Key=full, Body=b"probe", IfNoneMatch="*"
                    )
                    return True
                except ClientError as exc:
                    status, code = _status(exc), _code(exc)
                    if status == 412 or code == "PreconditionFailed":
                        return False
                    if status == 501 or code == "NotImplemented":
                        raise _Unsupported("conditional PUT refused") from None
                    raise

            try:
                self._call(create, op="PutObjectIfAbsent", key=probe)
                honoured = not self._call(create, op="PutObjectIfAbsent", key=probe)
            except _Unsupported:
                honoured = False
            finally:
                self.delete(probe)
            if not honoured:
                log.warning(
                    "%s: conditional writes not supported; create-only writes fall back to HEAD then PUT",
                    self.url,
                )
            self._conditional_put = honoured

    def _head(self, key: str) -> dict[str, Any] | None:
        full = self._full(key)

        def head() -> dict[str, Any] | None:
            try:
                return self._client.head_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if _status(exc) == 404:
                    return None
                raise

        return self._call(head, op="HeadObject", key=key)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def stat(self, key: str) -> ObjectInfo:
        resp = self._head(key)
        if resp is None:
            raise NotFound(f"no object {self._where(key)}")
        return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        full_prefix = self._prefix + prefix
        strip = len(self._prefix)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": full_prefix,
                "MaxKeys": self.list_page_size,
            }
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(
                lambda kw=kwargs: self._client.list_objects_v2(**kw), op="ListObjectsV2", key=prefix
            )
            for item in page.get("Contents", ()):
                key = item["Key"]
                if not key.startswith(self._prefix):
                    continue
                yield ObjectInfo(key[strip:], int(item["Size"]), item["LastModified"].timestamp())
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def delete(self, key: str) -> None:
        full = self._full(key)

        def delete() -> None:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if _status(exc) == 404 and _code(exc) in ("NoSuchKey", "404", ""):
                    return
                raise

        self._call(delete, op="DeleteObject", key=key)

    def delete_many(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(self._full(key))
            if len(batch) >= self.delete_batch_size:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, fulls: list[str]) -> None:
        strip = len(self._prefix)
        if self._batch_delete:
            pending = list(fulls)

            def attempt() -> None:
                nonlocal pending
                try:
                    resp = self._client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": k} for k in pending], "Quiet": True},
                    )
                except ClientError as exc:
                    if _status(exc) == 501 or _code(exc) in BATCH_DELETE_UNSUPPORTED:
                        raise _Unsupported(f"batch delete refused: {_code(exc)}") from None
                    raise
                failed = []
                for err in resp.get("Errors", ()):
                    code = err.get("Code", "")
                    if code == "NoSuchKey":
                        continue
                    if code in ("AccessDenied", "AllAccessDisabled"):
                        raise PermanentBackendError(
                            f"S3 DeleteObjects {self._where(err.get('Key', '')[strip:])}: access denied ({code})"
                        )
                    failed.append(err["Key"])
                if failed:
                    pending = failed
                    raise PartialBatchDelete(
                        f"{len(failed)} of the batch not deleted (e.g. {failed[0]})"
                    )

            try:
                self._call(attempt, op="DeleteObjects", key=fulls[0][strip:])
                return
            except _Unsupported:
                with self._flag_lock:
                    self._batch_delete = False
        for full in fulls:
            self.delete(full[strip:])

    def close(self) -> None:
        self._client.close()


class PartialBatchDelete(Exception):
    """Some keys of a batch delete failed with a retryable per-key error."""
