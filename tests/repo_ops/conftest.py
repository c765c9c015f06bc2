"""Fixtures of the repository-operations tests (writer, prune, GC, verify, worker, CLI)."""

from __future__ import annotations

import pytest

from orchestrator.repo.backends import open_backend
from orchestrator.repo.repository import Repository
from tests.repo_ops.helpers import CountingBackend

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch):
    # scrypt with N=2^17 takes ~0.3 s; tests use the config module's insecure test knob
    monkeypatch.setenv("FASTPATH_INSECURE_TEST_KDF_N", "1024")


@pytest.fixture
def counting_local(tmp_path):
    backend = CountingBackend(open_backend(tmp_path / "repo"))
    yield backend
    backend.close()


@pytest.fixture
def repo(counting_local):
    """A fresh unencrypted local repository over a counting backend."""
    return Repository.init(counting_local)


@pytest.fixture
def encrypted_repo(tmp_path):
    backend = CountingBackend(open_backend(tmp_path / "enc"))
    return Repository.init(backend, encrypt=True, passphrase=PASSPHRASE)


@pytest.fixture(params=["local", "s3"])
def any_repo(request, tmp_path):
    """The same tests on a local directory and on S3 (moto server)."""
    if request.param == "local":
        backend = CountingBackend(open_backend(tmp_path / "repo"))
    else:
        s3_env = request.getfixturevalue("s3_env")
        from tests.fixtures.s3 import fast_retry

        backend = CountingBackend(open_backend(s3_env.url, retry=fast_retry()))
    yield Repository.init(backend)
    backend.close()
