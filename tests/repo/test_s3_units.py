"""S3 backend paths that moto cannot produce (per-key errors inside a 200 DeleteObjects answer),
scripted with botocore's Stubber on the backend's own client. Everything else about S3 is tested
against the moto server (test_backend_contract.py, test_s3_faults.py)."""

from __future__ import annotations

import random

import boto3
import pytest
from botocore.stub import Stubber

from orchestrator.repo.backends.s3 import S3Backend
from orchestrator.repo.errors import PermanentBackendError
from orchestrator.repo.retry import RetryPolicy


@pytest.fixture
def stubbed():
    session = boto3.session.Session(
        aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    )
    backend = S3Backend(
        "s3://bucket/repo",
        endpoint_url="http://127.0.0.1:9",
        check_bucket=False,
        session=session,
        retry=RetryPolicy(deadline=5, base=0.001, cap=0.001, rng=random.Random(1)),
    )
    with Stubber(backend._client) as stub:
        yield backend, stub
    backend.close()


def objects(*keys):
    return {"Objects": [{"Key": f"repo/{k}"} for k in keys], "Quiet": True}


def test_per_key_errors_are_retried_for_those_keys_only(stubbed):
    backend, stub = stubbed
    stub.add_response(
        "delete_objects",
        {
            "Errors": [
                {"Key": "repo/b", "Code": "InternalError", "Message": "try again"},
                {"Key": "repo/c", "Code": "NoSuchKey"},
            ]
        },
        {"Bucket": "bucket", "Delete": objects("a", "b", "c")},
    )
    stub.add_response("delete_objects", {}, {"Bucket": "bucket", "Delete": objects("b")})
    backend.delete_many(["a", "b", "c"])
    stub.assert_no_pending_responses()
    assert backend.retry.stats()["retries"] == {"PartialBatchDelete": 1}


def test_per_key_access_denied_is_permanent(stubbed):
    backend, stub = stubbed
    stub.add_response(
        "delete_objects",
        {"Errors": [{"Key": "repo/a", "Code": "AccessDenied", "Message": "no"}]},
        {"Bucket": "bucket", "Delete": objects("a")},
    )
    with pytest.raises(PermanentBackendError, match="s3://bucket/repo/a.*access denied"):
        backend.delete_many(["a"])


def test_batches_are_split(stubbed):
    backend, stub = stubbed
    backend.delete_batch_size = 2
    stub.add_response("delete_objects", {}, {"Bucket": "bucket", "Delete": objects("a", "b")})
    stub.add_response("delete_objects", {}, {"Bucket": "bucket", "Delete": objects("c")})
    backend.delete_many(iter(["a", "b", "c"]))
    stub.assert_no_pending_responses()


def test_truncated_body_against_content_length_is_retried(stubbed):
    import io

    from botocore.response import StreamingBody

    backend, stub = stubbed
    # A body shorter than its Content-Length. botocore's own check raises IncompleteReadError
    # at read(); ours (TruncatedBody) backs it up. Either way: retried, then the full object.
    stub.add_response(
        "get_object",
        {"Body": StreamingBody(io.BytesIO(b"12345"), 5), "ContentLength": 10},
        {"Bucket": "bucket", "Key": "repo/k"},
    )
    stub.add_response(
        "get_object",
        {"Body": StreamingBody(io.BytesIO(b"0123456789"), 10), "ContentLength": 10},
        {"Bucket": "bucket", "Key": "repo/k"},
    )
    assert backend.get("k") == b"0123456789"
    assert backend.retry.stats()["retries"] == {"TruncatedBody": 1}
