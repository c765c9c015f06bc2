"""The fault proxy itself: each fault kind produces the symptom it claims, seen by a plain HTTP
client (not boto3), and decisions are reproducible from the seed."""

from __future__ import annotations

import http.client
from urllib.parse import urlparse

import pytest

from tests.fixtures.s3 import FAULT_KINDS, FaultProxy


def signed_get(proxy, bucket, key):
    """A presigned URL for the proxy's address (moto refuses anonymous reads)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=proxy.url, config=Config(s3={"addressing_style": "path"})
    )
    url = urlparse(
        client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
    )
    return f"{url.path}?{url.query}"


def request(proxy, method, path, body=None):
    u = urlparse(proxy.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


@pytest.fixture
def bucket(s3_env):
    s3_env.client().put_object(Bucket=s3_env.bucket, Key="obj", Body=b"x" * 10000)
    return s3_env.bucket


def test_pass_through(fault_proxy, bucket):
    status, _ctype, body = request(fault_proxy, "GET", signed_get(fault_proxy, bucket, "obj"))
    assert status == 200 and body == b"x" * 10000
    assert fault_proxy.count("forwarded") == 1 and fault_proxy.count("faulted") == 0


@pytest.mark.parametrize(
    "kind,status,words",
    [
        ("500", 500, b"InternalError"),
        ("503", 503, b"ServiceUnavailable"),
        ("slowdown", 503, b"SlowDown"),
        ("html", 502, b"<html>"),
        ("empty", 500, b""),
        ("unknown_4xx", 400, b"XFlakyTransient"),
        ("unknown_5xx", 500, b"WeirdInternalThing"),
    ],
)
def test_canned_errors(fault_proxy, bucket, kind, status, words):
    fault_proxy.force(kind)
    got_status, ctype, body = request(fault_proxy, "GET", f"/{bucket}/obj")
    assert got_status == status and words in body
    assert (body == b"") == (kind == "empty")
    assert ("html" in ctype) == (kind == "html")
    assert fault_proxy.count("forwarded") == 0


def test_truncate_cuts_the_body(fault_proxy, bucket):
    fault_proxy.force("truncate")
    with pytest.raises(http.client.IncompleteRead) as err:
        request(fault_proxy, "GET", signed_get(fault_proxy, bucket, "obj"))
    assert len(err.value.partial) == 5000 and err.value.expected == 5000
    assert fault_proxy.count("forwarded") == 1


@pytest.mark.parametrize("kind,forwarded", [("reset_before", 0), ("reset_after", 1)])
def test_resets(fault_proxy, s3_env, bucket, kind, forwarded):
    fault_proxy.force(kind)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        request(fault_proxy, "PUT", f"/{bucket}/new", body=b"data")
    assert fault_proxy.count("forwarded") == forwarded
    exists = "Contents" in s3_env.client().list_objects_v2(Bucket=bucket, Prefix="new")
    assert exists == bool(forwarded)  # reset_after: S3 did the write, the answer was lost


def test_decisions_are_reproducible_and_near_the_rate(moto_server):
    def run(seed):
        proxy = FaultProxy(moto_server.url, seed=seed)
        try:
            proxy.configure(rate=0.25)
            return [proxy.decide("GET", "/x")[0] for _ in range(2000)]
        finally:
            proxy.close()

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    faulted = sum(k is not None for k in a)
    assert 400 <= faulted <= 600
    assert {k for k in a if k} == set(FAULT_KINDS)
