"""One retry policy for every S3 call.

Any error is retried with exponential backoff and full jitter until a deadline — 5xx, SlowDown and
other throttling, connection resets, timeouts, truncated bodies, non-XML/HTML/empty error bodies,
unknown codes, 4xx with unknown codes, bodyless HEAD 4xx — because providers answer with all of
these for conditions that heal (Backblaze returns 500/503 routinely; Ceph answers some batch
deletes with MalformedXML). Only errors that cannot heal give up at once, with a one-line
:class:`PermanentBackendError`: bad credentials, a missing bucket, access denied (403 on a HEAD,
which has no body to say more), a redirect to another region, local configuration errors.

boto3's own retries are switched off (``total_max_attempts=1``) by the S3 backend: its retry loop
does not cover a truncated GET body (which surfaces at ``Body.read()``) nor a 4xx with an unknown
code, so the whole request — including reading the body — runs inside :meth:`RetryPolicy.call`.

Exceptions of this package (:class:`~orchestrator.repo.errors.RepoError`, e.g. NotFound raised by
the backend for a 404 that is an answer) pass through untouched; programming errors (TypeError,
AttributeError...) too. Everything else is translated here, at the boundary.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from botocore import exceptions as bce

from orchestrator.repo.errors import (
    PermanentBackendError,
    RepoError,
    RetryDeadlineExceeded,
    one_line,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

DEADLINE_ENV = "FASTPATH_S3_RETRY_DEADLINE"
DEFAULT_DEADLINE = 300.0
DEFAULT_BASE = 0.1
DEFAULT_CAP = 20.0

# Error codes that no amount of waiting heals, with what they mean for a person.
PERMANENT_CODES = {
    "InvalidAccessKeyId": "bad credentials: the access key id is not known to the server",
    "SignatureDoesNotMatch": "bad credentials: the secret access key does not match",
    "InvalidToken": "bad credentials: invalid session token",
    "ExpiredToken": "bad credentials: the session token has expired",
    "InvalidSecurity": "bad credentials",
    "NotSignedUp": "the account is not signed up for S3",
    "AccountProblem": "the account has a problem (see the provider)",
    "AllAccessDisabled": "all access to this resource is disabled",
    "AccessDenied": "access denied",
    "NoSuchBucket": "the bucket does not exist",
    "InvalidBucketName": "invalid bucket name",
    "AuthorizationHeaderMalformed": "wrong region or malformed authorization (check the region)",
    "PermanentRedirect": "the bucket lives at another endpoint or region",
    "KeyTooLongError": "object key too long",
    "EntityTooLarge": "object too large for the provider",
    "InvalidObjectState": "the object is archived and must be restored first",
}
HEAD_OPS = {"HeadObject", "HeadBucket"}

# Programming errors are not retried (they would fail the same way until the deadline).
BUG_TYPES = (TypeError, AttributeError, NameError, AssertionError, ImportError, NotImplementedError)

# botocore errors about transport or one response: retried. Every other BotoCoreError is about
# local configuration (no credentials, no region, invalid parameters...) and cannot heal.
TRANSIENT_BOTOCORE = (
    bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError
    bce.IncompleteReadError,
    bce.ChecksumError,
    bce.FlexibleChecksumError,
    bce.CredentialRetrievalError,
    bce.MetadataRetrievalError,
    bce.CapacityNotAvailableError,
)


class TruncatedBody(Exception):
    """A response body shorter (or longer) than its Content-Length."""


@dataclass(frozen=True)
class Verdict:
    permanent: bool
    cause: str  # short, for the counters: "SlowDown", "HTTP 503", "ConnectionClosedError"...
    detail: str  # one line, for messages


def classify(exc: BaseException, op: str = "") -> Verdict:
    """Decide whether ``exc`` (raised by a botocore call named ``op``) may heal."""
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        code = str(error.get("Code") or "")
        status = meta.get("HTTPStatusCode")
        message = one_line(error.get("Message") or "", 160)
        cause = code if code and not code.isdigit() else f"HTTP {status}"
        tail = f"{code or '-'}, HTTP {status}" + (f": {message}" if message else "")
        if code in PERMANENT_CODES:
            return Verdict(True, cause, f"{PERMANENT_CODES[code]} ({tail})")
        if status == 403 and op in HEAD_OPS:
            return Verdict(True, cause, f"access denied or bad credentials (HTTP 403 on {op})")
        if status == 404 and op == "HeadBucket":
            return Verdict(True, cause, "the bucket does not exist (HTTP 404 on HeadBucket)")
        if status in (301, 401):
            return Verdict(
                True,
                cause,
                f"{'wrong endpoint or region' if status == 301 else 'unauthorized'} ({tail})",
            )
        if op in HEAD_OPS and (not code or code.isdigit()):
            cause = f"HTTP {status} (HEAD)"
        return Verdict(False, cause, tail)
    if isinstance(exc, bce.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return Verdict(
            True, "SSLError", f"TLS certificate verification failed: {one_line(exc, 200)}"
        )
    if isinstance(exc, bce.NoCredentialsError):
        return Verdict(
            True, "NoCredentialsError", "no AWS credentials found (environment, profile or ~/.aws)"
        )
    if isinstance(exc, bce.BotoCoreError) and not isinstance(exc, TRANSIENT_BOTOCORE):
        return Verdict(True, type(exc).__name__, f"{type(exc).__name__}: {one_line(exc, 200)}")
    return Verdict(False, type(exc).__name__, f"{type(exc).__name__}: {one_line(exc, 200)}")


class RetryPolicy:
    """Retry ``fn`` on any healable error until ``deadline`` seconds after the first attempt.

    Delay before retry n (1-based) is uniform in [0, min(cap, base * 2**(n-1))] ("full jitter"),
    never past the deadline; one last attempt is made at the deadline. Thread-safe; one policy is
    shared by every call of a backend so ``stats()`` sums them.
    """

    def __init__(
        self,
        deadline: float = DEFAULT_DEADLINE,
        base: float = DEFAULT_BASE,
        cap: float = DEFAULT_CAP,
        rng: random.Random | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if deadline < 0 or base <= 0 or cap < base:
            raise ValueError(f"bad retry policy: deadline={deadline} base={base} cap={cap}")
        self.deadline = deadline
        self.base = base
        self.cap = cap
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._attempts: collections.Counter[str] = collections.Counter()
        self._retries: collections.Counter[str] = collections.Counter()
        self._permanent: collections.Counter[str] = collections.Counter()
        self._deadlines = 0

    @classmethod
    def from_env(cls, **kwargs: Any) -> RetryPolicy:
        text = os.environ.get(DEADLINE_ENV)
        if text:
            kwargs.setdefault("deadline", float(text))
        return cls(**kwargs)

    def call(self, fn: Callable[..., T], *args: Any, op: str, key: str = "", **kwargs: Any) -> T:
        with self._lock:
            self._calls[op] += 1
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                self._attempts[op] += 1
            try:
                return fn(*args, **kwargs)
            except RepoError:
                raise
            except BUG_TYPES:
                raise
            except Exception as exc:  # any error is classified
                verdict = classify(exc, op)
                where = f"S3 {op} {key}".rstrip()
                if verdict.permanent:
                    with self._lock:
                        self._permanent[verdict.cause] += 1
                    log.warning("%s: giving up (cannot heal): %s", where, verdict.detail)
                    raise PermanentBackendError(f"{where}: {verdict.detail}") from exc
                elapsed = self._clock() - start
                remaining = self.deadline - elapsed
                if remaining <= 0:
                    with self._lock:
                        self._deadlines += 1
                    log.warning(
                        "%s: deadline exceeded after %d attempts: %s",
                        where,
                        attempt,
                        verdict.detail,
                    )
                    raise RetryDeadlineExceeded(
                        f"{where}: still failing after {attempt} attempts in {elapsed:.1f}s "
                        f"(deadline {self.deadline:g}s); last error: {verdict.detail}"
                    ) from exc
                delay = self._rng.uniform(0, min(self.cap, self.base * 2 ** min(attempt - 1, 60)))
                with self._lock:
                    self._retries[verdict.cause] += 1
                log.debug(
                    "%s: attempt %d failed (%s), retrying in %.3fs",
                    where,
                    attempt,
                    verdict.detail,
                    delay,
                )
                self._sleep(min(delay, remaining))

    def stats(self) -> dict[str, Any]:
        """Counters: ``calls`` and ``attempts`` by operation, ``retries`` and ``permanent`` by
        cause, ``deadline_exceeded`` (a total), ``retried`` (total retries)."""
        with self._lock:
            return {
                "calls": dict(self._calls),
                "attempts": dict(self._attempts),
                "retries": dict(self._retries),
                "retried": sum(self._retries.values()),
                "permanent": dict(self._permanent),
                "deadline_exceeded": self._deadlines,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._calls.clear()
            self._attempts.clear()
            self._retries.clear()
            self._permanent.clear()
            self._deadlines = 0
