"""`fastpath repo passwd` and `repo key list|add|export` (issue 14, finding 4): passphrases
change by re-wrapping the data key, never by re-encrypting data."""

from __future__ import annotations

import hashlib
import os
import stat
import uuid

import pytest

from orchestrator.repo import keyring
from orchestrator.repo.backends import open_backend
from orchestrator.repo.errors import ConfigTampered, WrongPassphrase
from orchestrator.repo.repository import Repository
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import DiskModel, backup, restore
from tests.repo_ops.test_cli import as_json, fastpath, one_line_error

VM = str(uuid.UUID(int=0x44))


def snapshot(backend, prefix=""):
    """key -> sha256 of every object (but the key files)."""
    return {
        i.key: hashlib.sha256(backend.get(i.key)).hexdigest()
        for i in backend.list(prefix)
        if not i.key.startswith(("keys/", "locks/"))
    }


@pytest.fixture
def enc(tmp_path):
    url = tmp_path / "enc"
    repo = Repository.init(url, encrypt=True, passphrase=PASSPHRASE)
    disk = DiskModel(chunks=2, seed=4)
    disk.write_chunk(0, seed=40)
    disk.write_chunk(1, seed=41)
    rid, keys = backup(repo, VM, [disk])
    repo.close()
    files = {}
    for name, text in (("old", PASSPHRASE), ("new", "a new passphrase"), ("paper", "paper!")):
        files[name] = tmp_path / name
        files[name].write_text(text + "\n")
    return url, files, keys[disk.vdi], bytes(disk.data)


def test_passwd_rewraps_the_key_only_and_the_old_passphrase_fails(enc):
    url, pw, index_key, data = enc
    backend = open_backend(url)
    before = snapshot(backend)
    (key_before,) = [i.key for i in backend.list("keys/")]
    r = fastpath("repo", "passwd", url, "--passphrase-file", pw["old"],
                 "--new-passphrase-file", pw["new"], "--json")  # fmt: skip
    doc = as_json(r)
    assert r.returncode == 0 and doc["changed"] and doc["key"] == key_before, r.stderr
    assert snapshot(backend) == before  # no chunk, index or document rewritten
    assert [i.key for i in backend.list("keys/")] == [key_before]
    old = fastpath("list", url, "--passphrase-file", pw["old"], "--json")
    assert old.returncode == 1 and as_json(old)["exception"] == "WrongPassphrase"
    assert "wrong passphrase" in one_line_error(old)
    with pytest.raises(WrongPassphrase):
        Repository.open(url, passphrase=PASSPHRASE)
    repo = Repository.open(url, passphrase="a new passphrase")
    assert restore(repo, index_key) == data
    repo.close()
    again = fastpath("repo", "passwd", url, "--passphrase-file", pw["old"],
                     "--new-passphrase-file", pw["paper"], "--json")  # fmt: skip
    assert again.returncode == 1 and as_json(again)["exception"] == "WrongPassphrase"
    backend.close()


def test_key_add_list_and_both_passphrases_open(enc):
    url, pw, index_key, data = enc
    r = fastpath("repo", "key", "add", url, "--passphrase-file", pw["old"],
                 "--new-passphrase-file", pw["new"], "--label", "ops team", "--json")  # fmt: skip
    added = as_json(r)
    assert r.returncode == 0 and added["keys"] == 2 and added["label"] == "ops team", r.stderr
    for name in ("old", "new"):
        listing = as_json(fastpath("repo", "key", "list", url, "--passphrase-file", pw[name],
                                   "--json"))["keys"]  # fmt: skip
        assert len(listing) == 2
        (current,) = [k for k in listing if k["current"]]
        assert (current["key"] == added["key"]) == (name == "new")
    text = fastpath("repo", "key", "list", url, "--passphrase-file", pw["new"]).stdout
    assert "* " + added["key"] in text and "ops team" in text
    repo = Repository.open(url, passphrase="a new passphrase")
    assert restore(repo, index_key) == data
    repo.close()
    wrong = fastpath("list", url, "--passphrase-file", pw["paper"], "--json")
    assert wrong.returncode == 1 and "2 key file(s) tried" in one_line_error(wrong)


def test_export_is_a_paper_backup_that_restores_access(enc, tmp_path):
    url, pw, index_key, data = enc
    out = tmp_path / "paper-key.json"
    r = fastpath("repo", "key", "export", url, "--passphrase-file", pw["old"],
                 "--new-passphrase-file", pw["paper"], "-o", out, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert b"paper!" not in out.read_bytes() and PASSPHRASE.encode() not in out.read_bytes()
    backend = open_backend(url)
    assert len(list(backend.list("keys/"))) == 1  # exported, not added
    again = fastpath("repo", "key", "export", url, "--passphrase-file", pw["old"], "-o", out)
    assert again.returncode == 1 and "--force" in one_line_error(again)
    for info in list(backend.list("keys/")):  # the repository's key is lost
        backend.delete(info.key)
    assert fastpath("list", url, "--passphrase-file", pw["old"]).returncode == 1
    r = fastpath("repo", "key", "add", url, "--from", out, "--passphrase-file", pw["paper"],
                 "--json")  # fmt: skip
    assert r.returncode == 0 and as_json(r)["key"].startswith("keys/"), r.stderr
    added_id = as_json(r)["id"]
    repo = Repository.open(url, passphrase="paper!")
    assert restore(repo, index_key) == data
    repo.close()
    # an exported key does not fit another repository (its config MAC says so)
    other = tmp_path / "other"
    Repository.init(other, encrypt=True, passphrase="paper!").close()
    r = fastpath("repo", "key", "add", other, "--from", out, "--passphrase-file", pw["paper"],
                 "--json")  # fmt: skip
    assert r.returncode == 1 and "is a key of repository" in one_line_error(r)
    assert not [i for i in open_backend(other).list("keys/") if i.key.endswith(added_id)]
    backend.close()


def test_key_commands_refuse_an_unencrypted_repository(tmp_path):
    url = tmp_path / "plain"
    Repository.init(url).close()
    pfile = tmp_path / "pw"
    pfile.write_text("x\n")
    for cmd in (
        ["repo", "passwd", url, "--new-passphrase-file", pfile],
        ["repo", "key", "list", url],
        ["repo", "key", "add", url, "--new-passphrase-file", pfile],
    ):
        r = fastpath(*cmd, "--json")
        assert r.returncode == 1 and as_json(r)["exception"] == "NotEncrypted", r.stderr


def test_passwd_and_add_on_s3(s3_env):
    repo = Repository.init(s3_env.url, encrypt=True, passphrase=PASSPHRASE)
    keyring.add_key(repo, "second")
    keyring.change_passphrase(repo, "first, changed")
    repo.close()
    for passphrase in ("second", "first, changed"):
        Repository.open(s3_env.url, passphrase=passphrase).close()
    with pytest.raises(WrongPassphrase):
        Repository.open(s3_env.url, passphrase=PASSPHRASE)
    backend = open_backend(s3_env.url)
    backend.put("config", backend.get("config").replace(b'"zstd:1"', b'"none"'))
    with pytest.raises(ConfigTampered):  # every key checks the config
        Repository.open(backend, passphrase="second")
    backend.close()
