"""S3 through the fault-injecting proxy (tests/fixtures/s3.py) in front of a real moto server:
every fault heals through the retry policy; errors that cannot heal fail at once."""

from __future__ import annotations

import concurrent.futures
import os
import random

import pytest

from orchestrator.repo.backends import open_backend
from orchestrator.repo.errors import PermanentBackendError, RetryDeadlineExceeded
from tests.fixtures.s3 import FAULT_KINDS, fast_retry


def proxied(s3_env, proxy, **kw):
    kw.setdefault("retry", fast_retry(60.0))
    return open_backend(s3_env.url, endpoint_url=proxy.url, **kw)


def direct_objects(s3_env) -> dict[str, bytes]:
    """What moto holds, read without the proxy and without our backend (the oracle)."""
    client = s3_env.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=s3_env.bucket, Prefix="repo/"
    ):
        for item in page.get("Contents", ()):
            body = client.get_object(Bucket=s3_env.bucket, Key=item["Key"])["Body"].read()
            out[item["Key"][len("repo/") :]] = body
    return out


def test_heavy_traffic_with_a_quarter_of_requests_faulted(s3_env, fault_proxy):
    fault_proxy.configure(rate=0.25, latency=(0.05, 0.02))
    backend = proxied(s3_env, fault_proxy, concurrency=8)
    rng = random.Random(3)
    objects = {
        f"chunks/{i % 16:02x}/obj{i:04d}": rng.randbytes(rng.choice([0, 100, 4096, 65536, 300_000]))
        for i in range(200)
    }
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: backend.put(*kv), objects.items()))
        created = list(
            pool.map(lambda k: backend.put_if_absent(f"locks/{k}", b"lock %d" % k), range(40))
        )
        assert created == [True] * 40
        again = list(pool.map(lambda k: backend.put_if_absent(f"locks/{k}", b"other"), range(40)))
        assert again == [False] * 40
        assert direct_objects(s3_env) == {
            **objects,
            **{f"locks/{k}": b"lock %d" % k for k in range(40)},
        }
        got = dict(zip(objects, pool.map(backend.get, objects)))
        assert got == objects
        assert all(pool.map(backend.exists, objects))
        assert {i.key: i.size for i in backend.list("chunks/")} == {
            k: len(v) for k, v in objects.items()
        }
        keys = sorted(objects)
        backend.delete_many(keys[:120])
        list(pool.map(backend.delete, keys[120:]))
    backend.delete_many(f"locks/{k}" for k in range(40))
    assert list(backend.list()) == []
    assert direct_objects(s3_env) == {}
    requests, faulted = fault_proxy.count("requests"), fault_proxy.count("faulted")
    assert faulted >= 0.2 * requests and requests > 800
    assert all(fault_proxy.count(kind) > 0 for kind in FAULT_KINDS), fault_proxy.counters
    stats = backend.retry.stats()
    assert stats["retried"] >= faulted * 0.9  # (a few HEAD 4xx are healed by botocore's redirector)
    assert stats["permanent"] == {} and stats["deadline_exceeded"] == 0


OPERATIONS = ["put", "put_if_absent", "get", "exists", "stat", "list", "delete", "delete_many"]


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("op", OPERATIONS)
def test_every_fault_kind_heals_on_every_operation(s3_env, fault_proxy, kind, op):
    backend = proxied(s3_env, fault_proxy)
    data = os.urandom(200_000)
    if op not in ("put", "put_if_absent"):
        backend.put("obj", data)
    backend._probe_conditional_writes()  # so that the forced fault hits the operation itself
    backend.retry.reset_stats()
    fault_proxy.force(kind, 1)
    if op == "put":
        backend.put("obj", data)
    elif op == "put_if_absent":
        assert backend.put_if_absent("obj", data) is True  # even if the first answer was lost
    elif op == "get":
        assert backend.get("obj") == data
    elif op == "exists":
        assert backend.exists("obj")
    elif op == "stat":
        assert backend.stat("obj").size == len(data)
    elif op == "list":
        assert [i.key for i in backend.list()] == ["obj"]
    elif op == "delete":
        backend.delete("obj")
    else:
        backend.delete_many(["obj"])
    assert fault_proxy.count(kind) == 1
    expected = {} if op.startswith("delete") else {"obj": data}
    assert direct_objects(s3_env) == expected
    stats = backend.retry.stats()
    # The fault was seen and retried by our policy (a bodyless HEAD 400 is retried by botocore's
    # region redirector before it reaches us, which heals it just the same).
    assert stats["retried"] == 1 or (kind == "unknown_4xx" and op in ("exists", "stat"))
    backend.close()


def test_put_if_absent_lost_answer_does_not_claim_someone_elses_object(s3_env, fault_proxy):
    backend = proxied(s3_env, fault_proxy)
    fault_proxy.force("reset_before", 1)  # our first attempt never reaches S3...
    s3_env.client().put_object(Bucket=s3_env.bucket, Key="repo/lock", Body=b"theirs")  # ...they win
    assert backend.put_if_absent("lock", b"mine") is False
    assert backend.get("lock") == b"theirs"


def test_read_timeout_is_retried(s3_env, fault_proxy):
    backend = proxied(s3_env, fault_proxy, read_timeout=0.5)
    backend.put("obj", b"data")
    fault_proxy.stall_seconds = 1.5
    fault_proxy.force("stall", 1)
    assert backend.get("obj") == b"data"
    assert backend.retry.stats()["retries"] == {"ReadTimeoutError": 1}


def test_deadline_exceeded_names_the_cause(s3_env, fault_proxy):
    backend = proxied(s3_env, fault_proxy, retry=fast_retry(1.0))
    fault_proxy.configure(rate=1.0, kinds=["slowdown"])
    with pytest.raises(RetryDeadlineExceeded, match=r"SlowDown") as err:
        backend.get("config")
    assert f"{s3_env.url}/config" in str(err.value)


def test_no_flexible_checksum_headers_on_writes(s3_env, fault_proxy):
    backend = proxied(s3_env, fault_proxy)
    backend.put("a", b"x" * 1000)
    backend.put_if_absent("b", b"y")
    backend.get("a")
    for method, _path, headers in fault_proxy.headers_seen:
        if method in ("PUT", "GET"):
            lowered = {k.lower() for k in headers}
            assert not any(h.startswith("x-amz-checksum") for h in lowered), headers
            assert "x-amz-sdk-checksum-algorithm" not in lowered
            assert "x-amz-checksum-mode" not in lowered


def test_conditional_put_falls_back_when_the_provider_refuses_it(s3_env, fault_proxy):
    fault_proxy.reject(lambda m, p, h: m == "PUT" and h.get("If-None-Match"), 501, "NotImplemented")
    backend = proxied(s3_env, fault_proxy)
    assert backend.put_if_absent("a", b"1") is True
    assert backend.put_if_absent("a", b"2") is False
    assert backend.put_if_absent("b", b"3") is True
    assert direct_objects(s3_env) == {"a": b"1", "b": b"3"}
    conditional = [
        h for m, _p, h in fault_proxy.headers_seen if m == "PUT" and h.get("If-None-Match")
    ]
    assert len(conditional) == 1  # remembered: asked once only


def test_provider_that_ignores_if_none_match_is_detected(s3_env, fault_proxy):
    fault_proxy.drop_headers = {"If-None-Match"}  # writes succeed, the condition is ignored
    backend = proxied(s3_env, fault_proxy)
    assert backend.put_if_absent("a", b"1") is True
    assert backend.put_if_absent("a", b"2") is False
    assert direct_objects(s3_env) == {"a": b"1"}  # the probe object is gone too
    assert backend._conditional_put is False


def test_conditional_probe_runs_once(s3_env, fault_proxy):
    backend = proxied(s3_env, fault_proxy)
    for i in range(3):
        assert backend.put_if_absent(f"k{i}", b"x") is True
    probes = [p for m, p, _h in fault_proxy.headers_seen if m == "PUT" and "probes/" in p]
    assert len(probes) == 2 and backend._conditional_put is True
    assert direct_objects(s3_env) == {f"k{i}": b"x" for i in range(3)}


def test_batch_delete_falls_back_to_single_deletes(s3_env, fault_proxy):
    fault_proxy.reject(
        lambda m, p, h: m == "POST" and "delete" in p, 400, "MalformedXML"
    )  # Ceph-like
    backend = proxied(s3_env, fault_proxy)
    for i in range(5):
        backend.put(f"k{i}", b"x")
    backend.delete_many([f"k{i}" for i in range(3)])
    backend.delete_many(["k3"])
    assert direct_objects(s3_env) == {"k4": b"x"}
    assert fault_proxy.count("rejected MalformedXML") == 1


def test_missing_bucket_fails_at_once(s3_env):
    url = "s3://no-such-bucket-here/repo"
    retry = fast_retry(300.0)
    with pytest.raises(PermanentBackendError, match="bucket does not exist") as err:
        open_backend(url, retry=retry)
    assert url in str(err.value) and "\n" not in str(err.value)
    assert retry.stats()["attempts"] == {"ListObjectsV2": 1}  # no retry, despite a long deadline


def test_missing_bucket_on_first_use(s3_env):
    backend = open_backend(
        "s3://no-such-bucket-here/repo", retry=fast_retry(300.0), check_bucket=False
    )
    with pytest.raises(PermanentBackendError, match="bucket does not exist"):
        backend.get("config")
    with pytest.raises(PermanentBackendError, match="bucket does not exist"):
        backend.put("config", b"x")


def test_missing_credentials_fail_at_once(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(PermanentBackendError, match="no AWS credentials"):
        open_backend(s3_env.url, retry=fast_retry(300.0))


@pytest.mark.parametrize(
    "bad,words",
    [
        ({"AWS_ACCESS_KEY_ID": "AKIANOTAREALKEY00000"}, "access key id"),
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "secret access key"),
    ],
)
def test_wrong_credentials_fail_at_once_with_one_line(
    moto_auth_server, monkeypatch, tmp_path, bad, words
):
    from tests.fixtures.s3 import aws_env

    env = {**aws_env(moto_auth_server.server.url, tmp_path), **moto_auth_server.good_credentials}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{moto_auth_server.bucket}/repo-{tmp_path.name}"
    good = open_backend(url, retry=fast_retry(300.0))  # the oracle accepts the right credentials
    good.put("config", b"ok")
    assert good.get("config") == b"ok"
    for name, value in bad.items():
        monkeypatch.setenv(name, value)
    retry = fast_retry(300.0)
    with pytest.raises(PermanentBackendError, match=words) as err:
        open_backend(url, retry=retry)
    assert "\n" not in str(err.value) and url in str(err.value)
    assert retry.stats()["attempts"] == {"ListObjectsV2": 1}
    lazy = open_backend(url, retry=retry, check_bucket=False)
    with pytest.raises(PermanentBackendError, match=words):
        lazy.get("config")
    with pytest.raises(PermanentBackendError, match="403"):
        lazy.exists("config")  # a HEAD: no body, so no code, but 403 on HEAD cannot heal
    assert retry.stats()["retried"] == 0


def test_addressing_style(s3_env, monkeypatch):
    assert open_backend(s3_env.url, check_bucket=False).addressing == "path"  # custom endpoint
    monkeypatch.setenv("FASTPATH_S3_ADDRESSING", "virtual")
    assert open_backend(s3_env.url, check_bucket=False).addressing == "virtual"
    monkeypatch.setenv("FASTPATH_S3_ADDRESSING", "sideways")
    with pytest.raises(ValueError):
        open_backend(s3_env.url, check_bucket=False)


def test_endpoint_comes_from_the_environment(s3_env):
    backend = open_backend(s3_env.url)
    assert backend.endpoint_url == s3_env.endpoint
    backend.put("x", b"1")
    assert direct_objects(s3_env) == {"x": b"1"}


@pytest.mark.parametrize("url", ["s3://", "s3:///x", "s3://b/a/../c", "s3://b/x?y=1"])
def test_bad_s3_urls(url):
    with pytest.raises(ValueError):
        open_backend(url, check_bucket=False)
