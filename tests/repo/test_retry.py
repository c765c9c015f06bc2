"""The retry policy's classification, judged on real botocore exception objects: S3 error
responses are parsed by botocore's own rest-xml parser from raw status/headers/body, as they
arrive from a provider; transport errors are botocore's own classes."""

from __future__ import annotations

import random
import threading

import botocore.session
import pytest
from botocore import exceptions as bce
from botocore import parsers

from orchestrator.repo.errors import NotFound, PermanentBackendError, RetryDeadlineExceeded
from orchestrator.repo.retry import RetryPolicy, TruncatedBody, classify

S3_MODEL = botocore.session.get_session().get_service_model("s3")


def s3_error(op: str, status: int, body: bytes = b"", content_type: str = "application/xml"):
    """A ClientError exactly as botocore builds it from an HTTP response."""
    parser = parsers.create_parser("rest-xml")
    response = {"status_code": status, "headers": {"content-type": content_type}, "body": body}
    parsed = parser.parse(response, S3_MODEL.operation_model(op).output_shape)
    return bce.ClientError(parsed, op)


def xml(code: str, message: str = "msg") -> bytes:
    return f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()


RETRIED = [
    ("GetObject", 503, xml("SlowDown"), "SlowDown"),
    ("PutObject", 500, xml("InternalError"), "InternalError"),
    ("PutObject", 503, xml("ServiceUnavailable"), "ServiceUnavailable"),
    ("GetObject", 502, b"<html><body>Bad Gateway</body></html>", "HTTP 502"),
    ("GetObject", 500, b"", "HTTP 500"),
    ("ListObjectsV2", 400, xml("XUnheardOfCode"), "XUnheardOfCode"),
    ("PutObject", 409, xml("ConditionalRequestConflict"), "ConditionalRequestConflict"),
    ("GetObject", 403, xml("RequestTimeTooSkewed"), "RequestTimeTooSkewed"),
    ("DeleteObjects", 400, xml("MalformedXML"), "MalformedXML"),
    ("HeadObject", 400, b"", "HTTP 400 (HEAD)"),
    ("HeadObject", 503, b"", "HTTP 503 (HEAD)"),
    ("GetObject", 429, b"", "HTTP 429"),
    ("GetObject", 500, b"<Error><Code>Internal", None),  # cut-off XML
]


@pytest.mark.parametrize("op,status,body,cause", RETRIED)
def test_healable_errors_are_retried(op, status, body, cause):
    exc = s3_error(op, status, body)
    verdict = classify(exc, op)
    assert not verdict.permanent, verdict
    if cause:
        assert verdict.cause == cause


PERMANENT = [
    ("GetObject", 403, xml("InvalidAccessKeyId"), "access key id"),
    ("PutObject", 403, xml("SignatureDoesNotMatch"), "secret access key"),
    ("GetObject", 404, xml("NoSuchBucket"), "bucket does not exist"),
    ("PutObject", 403, xml("AccessDenied"), "access denied"),
    ("ListObjectsV2", 403, xml("AllAccessDisabled"), "disabled"),
    ("HeadObject", 403, b"", "HTTP 403 on HeadObject"),
    ("HeadBucket", 404, b"", "bucket does not exist"),
    ("HeadBucket", 403, b"", "access denied"),
    ("GetObject", 301, xml("PermanentRedirect"), "another endpoint"),
    ("HeadObject", 301, b"", "wrong endpoint"),
    ("GetObject", 400, xml("AuthorizationHeaderMalformed"), "region"),
]


@pytest.mark.parametrize("op,status,body,words", PERMANENT)
def test_errors_that_cannot_heal_are_permanent(op, status, body, words):
    verdict = classify(s3_error(op, status, body), op)
    assert verdict.permanent and words in verdict.detail and "\n" not in verdict.detail


TRANSPORT = [
    bce.ConnectionClosedError(endpoint_url="http://x"),
    bce.ReadTimeoutError(endpoint_url="http://x"),
    bce.ConnectTimeoutError(endpoint_url="http://x"),
    bce.EndpointConnectionError(endpoint_url="http://x"),
    bce.IncompleteReadError(actual_bytes=10, expected_bytes=20),
    bce.ResponseStreamingError(error="Connection broken"),
    bce.SSLError(endpoint_url="http://x", error="EOF occurred in violation of protocol"),
    bce.ChecksumError(checksum_type="crc32", expected_checksum="a", actual_checksum="b"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
    TruncatedBody("got 5 of 10 bytes"),
    ValueError("odd XML"),
]


@pytest.mark.parametrize("exc", TRANSPORT, ids=lambda e: type(e).__name__)
def test_transport_errors_are_retried(exc):
    verdict = classify(exc, "GetObject")
    assert not verdict.permanent and verdict.cause == type(exc).__name__


CONFIG = [
    bce.NoCredentialsError(),
    bce.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
    bce.ParamValidationError(report="Invalid bucket name"),
    bce.NoRegionError(),
    bce.SSLError(endpoint_url="https://x", error="[SSL: CERTIFICATE_VERIFY_FAILED] self-signed"),
]


@pytest.mark.parametrize("exc", CONFIG, ids=lambda e: type(e).__name__)
def test_local_configuration_errors_are_permanent(exc):
    assert classify(exc, "GetObject").permanent


class FakeTime:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def policy(t: FakeTime, **kw):
    kw.setdefault("deadline", 30.0)
    return RetryPolicy(base=0.1, cap=2.0, rng=random.Random(7), sleep=t.sleep, clock=t.clock, **kw)


def failing(errors, result="done"):
    errors = list(errors)

    def fn():
        if errors:
            raise errors.pop(0)
        return result

    return fn


def test_retries_until_success_with_full_jitter_backoff():
    t = FakeTime()
    p = policy(t)
    errs = [s3_error("GetObject", 503, xml("SlowDown"))] * 6 + [
        bce.ConnectionClosedError(endpoint_url="u")
    ] * 2
    assert p.call(failing(errs), op="GetObject", key="s3://b/k") == "done"
    assert len(t.sleeps) == 8
    for n, delay in enumerate(t.sleeps):
        assert 0 <= delay <= min(2.0, 0.1 * 2**n)
    assert len(set(t.sleeps)) == 8  # jittered, not a fixed schedule
    stats = p.stats()
    assert stats["retries"] == {"SlowDown": 6, "ConnectionClosedError": 2}
    assert stats["retried"] == 8 and stats["calls"] == {"GetObject": 1}
    assert stats["attempts"] == {"GetObject": 9}


def test_deadline_names_the_last_cause():
    t = FakeTime()
    p = policy(t, deadline=10.0)

    def always():
        raise s3_error("PutObject", 500, xml("InternalError", "We encountered an internal error"))

    with pytest.raises(RetryDeadlineExceeded) as err:
        p.call(always, op="PutObject", key="s3://b/p/chunks/ab/cd")
    msg = str(err.value)
    assert "s3://b/p/chunks/ab/cd" in msg and "InternalError" in msg and "PutObject" in msg
    assert "\n" not in msg
    assert t.now - 1000.0 == pytest.approx(10.0)  # the last attempt is at the deadline, not after
    assert p.stats()["deadline_exceeded"] == 1


def test_permanent_errors_give_up_at_once():
    t = FakeTime()
    p = policy(t)
    fn = failing(
        [
            s3_error(
                "GetObject",
                403,
                xml(
                    "InvalidAccessKeyId",
                    "The AWS Access Key Id you provided does not exist in our records.",
                ),
            )
        ]
    )
    with pytest.raises(PermanentBackendError, match="bad credentials") as err:
        p.call(fn, op="GetObject", key="s3://b/config")
    assert "s3://b/config" in str(err.value) and "\n" not in str(err.value)
    assert t.sleeps == [] and p.stats()["permanent"] == {"InvalidAccessKeyId": 1}
    assert isinstance(err.value.__cause__, bce.ClientError)


def test_answers_and_bugs_pass_through():
    t = FakeTime()
    p = policy(t)
    with pytest.raises(NotFound):
        p.call(failing([NotFound("no object s3://b/k")]), op="GetObject")
    with pytest.raises(TypeError):
        p.call(failing([TypeError("bug")]), op="GetObject")
    assert t.sleeps == []


def test_zero_deadline_means_one_attempt():
    t = FakeTime()
    p = policy(t, deadline=0.0)
    with pytest.raises(RetryDeadlineExceeded, match="1 attempts"):
        p.call(failing([TimeoutError("slow")] * 3), op="HeadObject")


def test_stats_are_thread_safe():
    p = RetryPolicy(deadline=5, base=1e-6, cap=1e-6, rng=random.Random(1))

    def worker():
        for _ in range(300):
            p.call(failing([TruncatedBody("short")]), op="GetObject")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stats = p.stats()
    assert stats["calls"] == {"GetObject": 2400}
    assert stats["attempts"] == {"GetObject": 4800}
    assert stats["retries"] == {"TruncatedBody": 2400}


def test_env_deadline(monkeypatch):
    monkeypatch.setenv("FASTPATH_S3_RETRY_DEADLINE", "42")
    assert RetryPolicy.from_env().deadline == 42.0


def test_bad_policy_arguments():
    with pytest.raises(ValueError):
        RetryPolicy(deadline=-1)
    with pytest.raises(ValueError):
        RetryPolicy(base=0)
