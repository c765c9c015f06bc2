"""An encrypted repository's config is authenticated by its key: edited, it is refused, never
obeyed (issue 14, finding 1). Each test edits the stored objects as an attacker with write access
to the repository (but not the passphrase) would."""

from __future__ import annotations

import base64
import json
import os
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from orchestrator.repo.backends import open_backend
from orchestrator.repo.errors import ConfigTampered, NotEncrypted, RepoError
from orchestrator.repo.repository import Repository
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import DiskModel, backup
from tests.repo_ops.test_cli import as_json, fastpath, one_line_error

VM = str(uuid.UUID(int=0x14))


def edit_config(backend, **changes):
    doc = json.loads(backend.get("config"))
    for name, value in changes.items():
        if value is _DELETE:
            doc.pop(name, None)
        else:
            doc[name] = value
    backend.put("config", json.dumps(doc).encode())


_DELETE = object()


def chunk_keys(backend):
    return sorted(i.key for i in backend.list("chunks/"))


@pytest.fixture(params=["local", "s3"])
def enc_url(request, tmp_path):
    """The URL of a fresh encrypted repository (local directory, or S3 on a moto server)."""
    if request.param == "local":
        url = str(tmp_path / "enc")
    else:
        url = request.getfixturevalue("s3_env").url
    Repository.init(url, encrypt=True, passphrase=PASSPHRASE).close()
    return url


@pytest.mark.parametrize(
    "changes",
    [
        {"encryption": None},  # "switch encryption off"
        {"encryption": _DELETE},  # the whole section removed
        {"version": 1, "encryption": None},
    ],
    ids=["null", "deleted", "v1-null"],
)
def test_encryption_stripped_from_the_config_is_refused(enc_url, changes):
    backend = open_backend(enc_url)
    edit_config(backend, **changes)
    for passphrase, need_key in ((PASSPHRASE, True), (None, False), (None, True)):
        with pytest.raises(ConfigTampered, match="config was edited; refusing to open"):
            Repository.open(backend, passphrase=passphrase, need_key=need_key)
    backend.close()


@pytest.mark.parametrize(
    "changes",
    [
        {"compression": "none"},
        {"version": 1},
        {"created": "2020-01-01T00:00:00Z"},
        {"extra": "an unknown field is covered too"},
    ],
)
def test_any_edit_of_an_encrypted_config_is_refused(enc_url, changes):
    backend = open_backend(enc_url)
    edit_config(backend, **changes)
    with pytest.raises(ConfigTampered, match="does not match what the repository key|downgrade"):
        Repository.open(backend, passphrase=PASSPHRASE)
    backend.close()


def test_a_changed_repository_id_is_refused(enc_url):
    backend = open_backend(enc_url)
    edit_config(backend, id="0" * 32)
    with pytest.raises(ConfigTampered):
        Repository.open(backend, passphrase=PASSPHRASE)
    backend.close()


def test_reformatted_but_equal_config_still_opens(enc_url):
    """The MAC covers the canonical document, not its spacing."""
    backend = open_backend(enc_url)
    doc = json.loads(backend.get("config"))
    backend.put("config", json.dumps(doc, indent=7).encode())
    Repository.open(backend, passphrase=PASSPHRASE).close()
    backend.close()


def test_passphrase_for_an_unencrypted_repository_is_refused(tmp_path):
    url = tmp_path / "plain"
    Repository.init(url).close()
    with pytest.raises(NotEncrypted, match="is not encrypted, but a passphrase was given"):
        Repository.open(url, passphrase=PASSPHRASE)
    pfile = tmp_path / "pw"
    pfile.write_text(PASSPHRASE + "\n")
    r = fastpath("list", url, "--passphrase-file", pfile, "--json")
    doc = as_json(r)
    assert r.returncode == 1 and doc["exception"] == "NotEncrypted"
    assert "drop --passphrase-file" in one_line_error(r)
    # the environment variable too (a job that sets it expects encryption), reads and writes
    for cmd in (["list", url], ["stats", url], ["prune", url, "--keep-last", "1"]):
        r = fastpath(*cmd, "--json", env={"FASTPATH_PASSPHRASE": PASSPHRASE})
        assert r.returncode == 1 and as_json(r)["exception"] == "NotEncrypted", cmd
        assert "unset FASTPATH_PASSPHRASE" in one_line_error(r)
    assert fastpath("list", url, "--json").returncode == 0


def _raw_disk(tmp_path, seed=1):
    path = tmp_path / f"disk{seed}.raw"
    path.write_bytes(os.urandom(1 << 20) + b"secret plaintext marker " * 1000 + bytes(1 << 20))
    return path


def _backup_vdi(url, source, pfile, vdi):
    return fastpath("backup", "vdi", "--source", source, "--repo", url, "--vdi", vdi,
                    "--vm", VM, "--passphrase-file", pfile, "--json")  # fmt: skip


def test_backup_vdi_into_a_stripped_config_exits_nonzero_and_writes_nothing(tmp_path):
    """The reported attack: config edited to "encryption": null, then
    `backup vdi --passphrase-file` used to exit 0 and store the disk's plaintext."""
    url = tmp_path / "enc"
    Repository.init(url, encrypt=True, passphrase=PASSPHRASE).close()
    pfile = tmp_path / "pw"
    pfile.write_text(PASSPHRASE + "\n")
    source = _raw_disk(tmp_path)
    vdi = str(uuid.uuid4())
    ok = _backup_vdi(url, source, pfile, vdi)
    assert ok.returncode == 0, ok.stderr
    backend = open_backend(url)
    before = chunk_keys(backend)
    edit_config(backend, encryption=None)
    r = _backup_vdi(url, source, pfile, str(uuid.uuid4()))
    doc = as_json(r)
    assert r.returncode == 1 and doc["ok"] is False and doc["exception"] == "ConfigTampered"
    assert "config was edited" in one_line_error(r)
    assert chunk_keys(backend) == before
    # also removing the key objects leaves a "plain" repository: the passphrase is refused
    for info in list(backend.list("keys/")):
        backend.delete(info.key)
    r = _backup_vdi(url, source, pfile, str(uuid.uuid4()))
    assert r.returncode == 1 and as_json(r)["exception"] == "ConfigTampered"  # still version 2
    edit_config(backend, version=1)
    r = _backup_vdi(url, source, pfile, str(uuid.uuid4()))
    doc = as_json(r)
    # this machine pinned it as encrypted: refused before any passphrase is used
    assert r.returncode == 1 and doc["exception"] == "RepositoryChanged"
    assert "fastpath repo forget" in one_line_error(r)
    # without the pin (another machine, or the pin forgotten) the passphrase is refused
    assert fastpath("repo", "forget", url, "--json").returncode == 0
    r = _backup_vdi(url, source, pfile, str(uuid.uuid4()))
    doc = as_json(r)
    assert r.returncode == 1 and doc["exception"] == "NotEncrypted"
    assert "is not encrypted, but a passphrase was given" in one_line_error(r)
    assert chunk_keys(backend) == before
    for key in chunk_keys(backend):
        assert b"secret plaintext marker" not in backend.get(key)
    backend.close()


def _legacy_repo(path) -> str:
    """An encrypted repository as version 1 wrote it: v1 key file and config, v1 indexes and
    plain JSON restore points (made by opening it and writing with the old formats)."""
    backend = open_backend(path)
    repo_id, key_id = os.urandom(16).hex(), os.urandom(8).hex()
    data_key, salt, nonce = os.urandom(32), os.urandom(16), os.urandom(12)
    kek = Scrypt(salt=salt, length=32, n=1024, r=8, p=1).derive(PASSPHRASE.encode())
    aad = f"xcp-fastpath-key v1 repo={repo_id} key={key_id}".encode()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    key_doc = {
        "format": "xcp-fastpath-key",
        "version": 1,
        "id": key_id,
        "kdf": {"name": "scrypt", "n": 1024, "r": 8, "p": 1, "salt": b64(salt)},
        "wrap": {"cipher": "aes-256-gcm", "nonce": b64(nonce),
                 "data": b64(AESGCM(kek).encrypt(nonce, data_key, aad))},
    }  # fmt: skip
    backend.put(f"keys/{key_id}", json.dumps(key_doc).encode())
    config = {
        "format": "xcp-fastpath-repository", "version": 1, "id": repo_id,
        "chunk_size": 2 << 20, "digest": "blake3", "compression": "zstd:1",
        "encryption": {"cipher": "aes-256-gcm", "key": f"keys/{key_id}"}, "created": "",
    }  # fmt: skip
    backend.put("config", json.dumps(config).encode())
    return backend


def test_version_1_encrypted_repository_is_readable_and_read_only(tmp_path):
    backend = _legacy_repo(tmp_path / "old")
    repo = Repository.open(backend, passphrase=PASSPHRASE, allow_legacy_v1=True)
    assert repo.legacy and repo.keys is None
    repo.legacy = False  # write with the version 1 formats, as the old program did
    disk = DiskModel(chunks=1, seed=3)
    disk.write_chunk(0, seed=4)
    rid, keys = backup(repo, VM, [disk])
    repo.close()
    assert json.loads(backend.get(f"backups/{rid}.json"))["id"] == rid  # plain JSON
    repo = Repository.open(backend, passphrase=PASSPHRASE, allow_legacy_v1=True)
    (point,) = repo.list_restore_points()
    assert repo.read_metadata(point)["id"] == rid
    assert b"".join(repo.iter_disk(repo.read_index(keys[disk.vdi]))) == bytes(disk.data)
    with pytest.raises(RepoError, match="read only; copy it into a new one"):
        repo.begin_backup(VM)
    repo.close()


def test_copy_with_one_passphrase_file_between_encrypted_and_plain(tmp_path):
    """`copy`'s --passphrase-file serves SRC and DST: an unencrypted DST does not refuse it,
    but an encrypted SRC into an unencrypted DST needs --allow-plaintext."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    repo = Repository.init(src, encrypt=True, passphrase=PASSPHRASE)
    disk = DiskModel(chunks=1, seed=6)
    disk.write_chunk(0, seed=60)
    rid, _ = backup(repo, VM, [disk])
    repo.close()
    Repository.init(dst).close()
    pfile = tmp_path / "pw"
    pfile.write_text(PASSPHRASE + "\n")
    r = fastpath("copy", src, dst, "--passphrase-file", pfile, "--json")
    assert r.returncode == 1 and as_json(r)["exception"] == "PlaintextRefused"
    assert "--allow-plaintext" in one_line_error(r)
    assert as_json(fastpath("list", dst, "--json"))["restore_points"] == []
    r = fastpath("copy", src, dst, "--passphrase-file", pfile, "--allow-plaintext", "--json")
    assert r.returncode == 0 and as_json(r)["ok"], r.stderr
    assert [p["id"] for p in as_json(fastpath("list", dst, "--json"))["restore_points"]] == [rid]
    # a DST-only passphrase file for an unencrypted DST is refused
    r = fastpath("copy", src, dst, "--passphrase-file", pfile, "--dst-passphrase-file", pfile,
                 "--json")  # fmt: skip
    assert r.returncode == 1 and as_json(r)["exception"] == "NotEncrypted"


def test_version_1_encrypted_repository_migrates_by_copy(tmp_path):
    """The documented way forward for an old encrypted repository: copy it into a new one."""
    from orchestrator.jobs.copy import copy_repository
    from tests.repo_ops.helpers import restore

    backend = _legacy_repo(tmp_path / "old")
    old = Repository.open(backend, passphrase=PASSPHRASE, allow_legacy_v1=True)
    old.legacy = False  # write with the version 1 formats, as the old program did
    disk = DiskModel(chunks=2, seed=7)
    disk.write_chunk(0, seed=70)
    disk.write_chunk(1, seed=71)
    rid, _ = backup(old, VM, [disk])
    old.close()
    old = Repository.open(backend, passphrase=PASSPHRASE, allow_legacy_v1=True)
    new = Repository.init(tmp_path / "new", encrypt=True, passphrase=PASSPHRASE)
    assert copy_repository(old, new)["ok"]
    (point,) = new.list_restore_points()
    assert point.id == rid and new.config.version == 2
    doc = new.read_metadata(point)
    index = new.read_point_index(point, doc, disk.vdi)
    assert restore(new, point.disks[disk.vdi]) == bytes(disk.data) and index.mac
    stored = new.backend.get(point.json_key)
    assert json.loads(stored)["format"] == "xcp-fastpath-sealed-restore-point"
    old.close()
    new.close()
