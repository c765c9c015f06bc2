from __future__ import annotations

import json
import os

import pytest

from orchestrator.repo import config as config_mod
from orchestrator.repo.backends import open_backend
from orchestrator.repo.config import (
    RepoConfig,
    get_passphrase,
    init_repo,
    load_repo,
    read_config,
)
from orchestrator.repo.errors import (
    PassphraseRequired,
    RepoError,
    RepoExists,
    RepoNotFound,
    UnknownFormat,
    WrongPassphrase,
)

FAST_N = 2**10  # test-only scrypt cost


@pytest.fixture
def backend(tmp_path):
    b = open_backend(tmp_path / "repo")
    yield b
    b.close()


def test_plain_repo_roundtrip(backend):
    created = init_repo(backend)
    config, codec = load_repo(backend)
    assert config == created and not config.encrypted
    assert json.loads(backend.get("config"))["format"] == "xcp-fastpath-repository"
    d = codec.digest(b"hello")
    assert codec.decode(codec.encode(b"hello", d), d) == b"hello"
    assert [i.key for i in backend.list("keys/")] == []


def test_encrypted_repo_roundtrip_and_dedup(backend):
    init_repo(backend, encrypt=True, passphrase="correct horse", scrypt_n=FAST_N)
    config, codec1 = load_repo(backend, "correct horse")
    _, codec2 = load_repo(backend, "correct horse")
    assert config.encrypted
    data = os.urandom(1000) * 10
    assert codec1.digest(data) == codec2.digest(data)  # same key, same digest: dedup works
    obj = codec1.encode(data, codec1.digest(data))
    assert codec2.decode(obj, codec2.digest(data)) == data
    keyfile = backend.get(config.encryption["key"])
    assert b"correct horse" not in keyfile and b"scrypt" in keyfile


def test_two_encrypted_repos_do_not_share_digests(tmp_path):
    a, b = open_backend(tmp_path / "a"), open_backend(tmp_path / "b")
    init_repo(a, encrypt=True, passphrase="same", scrypt_n=FAST_N)
    init_repo(b, encrypt=True, passphrase="same", scrypt_n=FAST_N)
    (_, ca), (_, cb) = load_repo(a, "same"), load_repo(b, "same")
    assert ca.digest(b"data") != cb.digest(b"data")


def test_wrong_passphrase_is_clear(backend):
    init_repo(backend, encrypt=True, passphrase="right", scrypt_n=FAST_N)
    with pytest.raises(WrongPassphrase, match="wrong passphrase") as err:
        load_repo(backend, "wrong")
    assert "\n" not in str(err.value) and backend.url in str(err.value)
    with pytest.raises(PassphraseRequired, match="encrypted"):
        load_repo(backend, None)


def test_tampered_key_file_is_refused(backend):
    config = init_repo(backend, encrypt=True, passphrase="pw", scrypt_n=FAST_N)
    name = config.encryption["key"]
    doc = json.loads(backend.get(name))
    doc["kdf"]["n"] = 2**40
    backend.put(name, json.dumps(doc).encode())
    with pytest.raises(UnknownFormat, match="scrypt parameters"):
        load_repo(backend, "pw")
    backend.put(name, b"not json")
    with pytest.raises(UnknownFormat):
        load_repo(backend, "pw")


def test_init_refuses_existing_repo(backend):
    init_repo(backend)
    with pytest.raises(RepoExists, match="already exists"):
        init_repo(backend)
    with pytest.raises(RepoExists):
        init_repo(backend, encrypt=True, passphrase="x", scrypt_n=FAST_N)


def test_init_argument_errors(backend):
    with pytest.raises(PassphraseRequired):
        init_repo(backend, encrypt=True)
    with pytest.raises(RepoError):
        init_repo(backend, passphrase="x")
    assert not backend.exists("config")


def test_missing_repo(backend):
    with pytest.raises(RepoNotFound, match="no repository"):
        load_repo(backend)


@pytest.mark.parametrize(
    "change",
    [
        {"version": 3},
        {"version": "1"},
        {"format": "borg"},
        {"digest": "sha256"},
        {"compression": "lz4"},
        {"chunk_size": 4 << 20},
        {"encryption": {"cipher": "chacha20"}},
    ],
)
def test_unknown_format_refused(backend, change):
    init_repo(backend)
    doc = json.loads(backend.get("config"))
    doc.update(change)
    backend.put("config", json.dumps(doc).encode())
    with pytest.raises(UnknownFormat):
        read_config(backend)


def test_garbage_config_refused(backend):
    backend.put("config", b"\x00\x01garbage")
    with pytest.raises(UnknownFormat, match="config"):
        load_repo(backend)


def test_default_kdf_cost_and_test_override(monkeypatch, backend):
    assert config_mod.SCRYPT_N >= 2**17
    monkeypatch.setenv(config_mod.TEST_KDF_ENV, str(FAST_N))
    config = init_repo(backend, encrypt=True, passphrase="pw")
    assert json.loads(backend.get(config.encryption["key"]))["kdf"]["n"] == FAST_N


def test_config_json_roundtrip():
    c = RepoConfig(encryption={"cipher": "aes-256-gcm", "key": "keys/abc"})
    assert RepoConfig.from_json(c.to_json()) == c


def test_get_passphrase_sources(monkeypatch, tmp_path):
    f = tmp_path / "pw"
    f.write_text("from file\nsecond line ignored\n")
    monkeypatch.setenv("FASTPATH_PASSPHRASE", "from env")
    assert get_passphrase(f) == "from file"
    assert get_passphrase() == "from env"
    monkeypatch.delenv("FASTPATH_PASSPHRASE")
    with pytest.raises(PassphraseRequired, match="FASTPATH_PASSPHRASE"):
        get_passphrase(prompt=False)
    with pytest.raises(PassphraseRequired, match="cannot read"):
        get_passphrase(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PassphraseRequired, match="empty"):
        get_passphrase(tmp_path / "empty")
    monkeypatch.setattr(config_mod.sys.stdin, "isatty", lambda: True, raising=False)
    answers = iter(["typed", "typed"])
    monkeypatch.setattr(config_mod.getpass, "getpass", lambda prompt: next(answers))
    assert get_passphrase(confirm=True) == "typed"


def test_concurrent_inits_have_one_winner_whose_key_works(tmp_path):
    import concurrent.futures

    backend = open_backend(tmp_path / "race")

    def attempt(n):
        try:
            init_repo(backend, encrypt=True, passphrase=f"pass {n}", scrypt_n=FAST_N)
            return n
        except RepoExists:
            return None

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(attempt, range(6)))
    winners = [n for n in results if n is not None]
    assert len(winners) == 1
    config, _codec = load_repo(backend, f"pass {winners[0]}")
    for n in set(range(6)) - set(winners):
        with pytest.raises(WrongPassphrase):
            load_repo(backend, f"pass {n}")
    assert [i.key for i in backend.list("keys/")] == [config.encryption["key"]]  # losers cleaned up


def test_encrypted_repo_on_s3(s3_backend):
    init_repo(s3_backend, encrypt=True, passphrase="pw", scrypt_n=FAST_N)
    config, codec = load_repo(s3_backend, "pw")
    assert config.encrypted and codec.encrypted
    with pytest.raises(WrongPassphrase, match=s3_backend.url):
        load_repo(s3_backend, "nope")
    with pytest.raises(RepoExists):
        init_repo(s3_backend)
