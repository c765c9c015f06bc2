"""Downgrade attacks on an encrypted repository by someone who can write its storage but has no
passphrase (security review, findings F1, F2, F5). Each test edits the stored objects as the
attacker would, then runs the real CLI (or the job's copy step) and checks that nothing is
written in plaintext and the error is one line saying why."""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.progress import Progress
from orchestrator.repo.backends import open_backend
from orchestrator.repo.errors import ConfigTampered, LegacyRefused
from orchestrator.repo.repository import Repository
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import DiskModel, backup
from tests.repo_ops.test_cli import as_json, fastpath, one_line_error
from tests.repo_ops.test_config_auth import _legacy_repo, _raw_disk, chunk_keys, edit_config

VM = str(uuid.UUID(int=0xF1))
MARKER = b"secret plaintext marker"


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A function giving the URL of a repository named ``name`` (local directory, or a prefix
    of a bucket on a moto server)."""
    if request.param == "local":
        return lambda name: str(tmp_path / name)
    s3 = request.getfixturevalue("s3_env")
    return lambda name: f"{s3.url}-{name}"


def _pfile(tmp_path, text=PASSPHRASE):
    path = tmp_path / f"pw-{len(text)}"
    path.write_text(text + "\n")
    return path


def strip_encryption(backend):
    """The full F1 attack: config says unencrypted version 1 and keys/ is moved away."""
    for info in list(backend.list("keys/")):
        backend.put("moved-away/" + info.key, backend.get(info.key))
        backend.delete(info.key)
    edit_config(backend, encryption=None, version=1)


def new_state_dir(tmp_path, monkeypatch, name="other-machine"):
    """Another client (no pin of anything yet)."""
    path = tmp_path / name
    monkeypatch.setenv("FASTPATH_STATE_DIR", str(path))
    return path


def _no_plaintext(backend, before):
    assert chunk_keys(backend) == before
    for key in chunk_keys(backend):
        assert MARKER not in backend.get(key)


# -- F1: a passphrase from any source for a repository that looks unencrypted ------------------


def test_env_passphrase_backup_into_a_stripped_repository_writes_nothing(
    where, tmp_path, monkeypatch
):
    url = where("enc")
    Repository.init(url, encrypt=True, passphrase=PASSPHRASE).close()
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    source = _raw_disk(tmp_path)

    def backup_vdi():
        return fastpath("backup", "vdi", "--source", source, "--repo", url,
                        "--vdi", str(uuid.uuid4()), "--vm", VM, "--json", env=env)  # fmt: skip

    r = backup_vdi()
    assert r.returncode == 0, r.stderr
    backend = open_backend(url)
    before = chunk_keys(backend)
    strip_encryption(backend)
    # this machine pinned the repository as encrypted, version 2
    r = backup_vdi()
    assert r.returncode == 1 and as_json(r)["exception"] == "RepositoryChanged", r.stderr
    err = one_line_error(r)
    assert "no longer says it is encrypted" in err and "repositories.json" in err
    assert f"fastpath repo forget {backend.url}" in err
    # a machine that never saw it: the passphrase in the environment is refused all the same
    new_state_dir(tmp_path, monkeypatch)
    r = backup_vdi()
    assert r.returncode == 1 and as_json(r)["exception"] == "NotEncrypted", r.stderr
    assert "unset FASTPATH_PASSPHRASE" in one_line_error(r)
    r = fastpath("list", url, "--json", env=env)  # reads too
    assert r.returncode == 1 and as_json(r)["exception"] == "NotEncrypted"
    _no_plaintext(backend, before)
    backend.close()


# -- F1 (b): copy, repair and copy-to into an unencrypted destination --------------------------


def _encrypted_with_a_point(url, seed=1):
    repo = Repository.init(url, encrypt=True, passphrase=PASSPHRASE)
    disk = DiskModel(chunks=1, seed=seed)
    disk.data[: len(MARKER)] = MARKER
    disk.write_chunk(0, seed=seed + 10)
    disk.data[: len(MARKER)] = MARKER
    rid, _ = backup(repo, VM, [disk])
    repo.close()
    return rid


def test_copy_into_a_stripped_destination_is_refused(where, tmp_path, monkeypatch):
    src, dst = where("src"), where("dst")
    _encrypted_with_a_point(src)
    Repository.init(dst, encrypt=True, passphrase=PASSPHRASE).close()
    pf = _pfile(tmp_path)
    r = fastpath("copy", src, dst, "--passphrase-file", pf, "--json")
    assert r.returncode == 0 and as_json(r)["ok"], r.stderr
    dst_backend = open_backend(dst)
    before = chunk_keys(dst_backend)
    strip_encryption(dst_backend)
    for info in list(dst_backend.list("backups/")):
        dst_backend.delete(info.key)  # so that a copy would write everything again
    r = fastpath("copy", src, dst, "--passphrase-file", pf, "--json")
    assert r.returncode == 1 and as_json(r)["exception"] == "RepositoryChanged", r.stderr
    new_state_dir(tmp_path, monkeypatch)
    r = fastpath("copy", src, dst, "--passphrase-file", pf, "--json")
    assert r.returncode == 1 and as_json(r)["exception"] == "PlaintextRefused", r.stderr
    assert "--allow-plaintext" in one_line_error(r)
    r = fastpath("copy", src, dst, "--json", env={"FASTPATH_PASSPHRASE": PASSPHRASE})
    assert r.returncode == 1 and as_json(r)["exception"] == "PlaintextRefused", r.stderr
    _no_plaintext(dst_backend, before)
    assert list(dst_backend.list("backups/")) == []
    dst_backend.close()


def test_plain_source_into_an_encrypted_destination_is_fine(tmp_path):
    src, dst = tmp_path / "plain", tmp_path / "enc"
    repo = Repository.init(src)
    disk = DiskModel(chunks=1, seed=2)
    disk.write_chunk(0, seed=20)
    rid, _ = backup(repo, VM, [disk])
    repo.close()
    Repository.init(dst, encrypt=True, passphrase=PASSPHRASE).close()
    r = fastpath("copy", src, dst, "--passphrase-file", _pfile(tmp_path), "--json")
    assert r.returncode == 0 and as_json(r)["ok"], r.stderr
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    listing = as_json(fastpath("list", dst, "--json", env=env))["restore_points"]
    assert [p["id"] for p in listing] == [rid]
    # both ends unencrypted: a passphrase is an error (one of them was stripped?)
    Repository.init(tmp_path / "plain2").close()
    r = fastpath("copy", src, tmp_path / "plain2", "--passphrase-file", _pfile(tmp_path),
                 "--json")  # fmt: skip
    assert r.returncode == 1 and as_json(r)["exception"] == "NotEncrypted"


def test_repair_from_an_encrypted_copy_into_a_plain_repository_needs_allow_plaintext(tmp_path):
    main, copy = tmp_path / "main", tmp_path / "copy"
    Repository.init(main).close()
    _encrypted_with_a_point(copy)
    pf = _pfile(tmp_path)
    r = fastpath("repair", main, "--from", copy, "--passphrase-file", pf, "--json")
    assert r.returncode == 1 and as_json(r)["exception"] == "PlaintextRefused", r.stderr
    r = fastpath("repair", main, "--from", copy, "--passphrase-file", pf, "--allow-plaintext",
                 "--json")  # fmt: skip
    assert r.returncode == 0 and as_json(r)["ok"], r.stderr


def _job(src, dst, pf, **kw):
    return SimpleNamespace(
        name="nightly", repository=str(src), passphrase_file=str(pf), copy_to=[str(dst)],
        copy_passphrase_file=None, copy_allow_plaintext=False, policy=lambda: None, **kw,
    )  # fmt: skip


def test_job_copy_to_a_stripped_destination_is_refused(tmp_path, monkeypatch):
    from orchestrator.jobs.job.config import load_job
    from orchestrator.jobs.job.runner import apply_copies

    src, dst = tmp_path / "src", tmp_path / "dst"
    _encrypted_with_a_point(src)
    Repository.init(dst, encrypt=True, passphrase=PASSPHRASE).close()
    dst_backend = open_backend(dst)
    strip_encryption(dst_backend)
    pf = _pfile(tmp_path)
    vms = [SimpleNamespace(uuid=VM)]
    ui = Progress("quiet", stream=io.StringIO())
    job = _job(src, dst, pf)
    (out,) = apply_copies(job, vms, ui)
    assert not out["ok"] and "--allow-plaintext" in out["error"]
    assert "copy-allow-plaintext = true" in out["error"]
    assert chunk_keys(dst_backend) == []
    job.copy_allow_plaintext = True  # deliberately
    (out,) = apply_copies(job, vms, ui)
    assert out["ok"], out
    assert chunk_keys(dst_backend)
    dst_backend.close()
    # the job file key
    jf = tmp_path / "job.toml"
    jf.write_text(
        f'name = "n"\nrepository = "{src}"\nvms = ["{VM}"]\ncopy-to = ["{dst}"]\n'
        f"copy-allow-plaintext = true\n"
    )
    assert load_job(str(jf)).copy_allow_plaintext is True


# -- F1 (c): the pin -------------------------------------------------------------------------


def test_pin_records_and_catches_a_replaced_repository(tmp_path):
    url = tmp_path / "enc"
    Repository.init(url, encrypt=True, passphrase=PASSPHRASE).close()
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    assert fastpath("list", url, "--json", env=env).returncode == 0
    pins = json.loads(pins_file().read_text())
    rec = pins["repositories"][str(url)]
    first_id = rec["id"]
    assert rec["encrypted"] is True and rec["version"] == 2
    # another repository (the attacker's, with a passphrase they chose) in its place
    shutil.rmtree(url)
    Repository.init(url, encrypt=True, passphrase=PASSPHRASE).close()
    r = fastpath("list", url, "--json", env=env)
    assert r.returncode == 1 and as_json(r)["exception"] == "RepositoryChanged"
    assert "its id changed" in one_line_error(r)
    r = fastpath("list", url, "--accept-repository-change", "--json", env=env)
    assert r.returncode == 0, r.stderr
    pins = json.loads(pins_file().read_text())
    assert pins["repositories"][str(url)]["id"] not in (first_id, None)
    # forget: the next open pins what it finds
    r = fastpath("repo", "forget", url, "--json")
    assert r.returncode == 0 and as_json(r)["forgotten"] is True
    assert str(url) not in json.loads(pins_file().read_text())["repositories"]
    assert as_json(fastpath("repo", "forget", url, "--json"))["forgotten"] is False


def pins_file():
    return Path(os.environ["FASTPATH_STATE_DIR"]) / "repositories.json"


def test_plain_to_encrypted_is_an_upgrade_and_init_repins(tmp_path):
    url = tmp_path / "r"
    assert fastpath("repo", "init", url, "--json").returncode == 0
    assert json.loads(pins_file().read_text())["repositories"][str(url)]["encrypted"] is False
    backend = open_backend(url)
    backend.delete("config")
    backend.close()
    pf = _pfile(tmp_path)
    r = fastpath("repo", "init", url, "--encrypt", "--passphrase-file", pf, "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(pins_file().read_text())["repositories"][str(url)]
    assert rec["encrypted"] is True and rec["id"] == as_json(r)["id"]
    assert fastpath("list", url, "--passphrase-file", pf, "--json").returncode == 0


def test_unwritable_state_dir_warns_once_and_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("FASTPATH_STATE_DIR", str(blocker / "state"))
    url = tmp_path / "plain"
    r = fastpath("repo", "init", url, "--json")
    assert r.returncode == 0, r.stderr
    source = _raw_disk(tmp_path)
    r = fastpath("backup", "vdi", "--source", source, "--repo", url, "--vdi", str(uuid.uuid4()),
                 "--vm", VM, "--json")  # fmt: skip
    assert r.returncode == 0 and as_json(r)["ok"], r.stderr
    assert r.stderr.count("repository pins") == 1, r.stderr


# -- F2: a version 1 key file copied into a version 2 repository -------------------------------


def test_v1_downgrade_of_a_v2_repository_is_refused(where, tmp_path, monkeypatch):
    pinned_here = os.environ["FASTPATH_STATE_DIR"]
    old = _legacy_repo(tmp_path / "old")  # the user's old repository, same passphrase
    v1_config = json.loads(old.get("config"))
    (v1_key,) = [i.key for i in old.list("keys/")]
    url = where("new")
    _encrypted_with_a_point(url)
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    assert fastpath("list", url, "--json", env=env).returncode == 0  # pinned: v2
    backend = open_backend(url)
    backend.put(v1_key, old.get(v1_key))
    backend.put("config", json.dumps(v1_config).encode())
    # the v2 key file is still there: refused whatever the options
    for extra in ([], ["--legacy-v1"]):
        new_state_dir(tmp_path, monkeypatch, f"m{len(extra)}")
        r = fastpath("list", url, *extra, "--json", env=env)
        assert r.returncode == 1 and as_json(r)["exception"] == "ConfigTampered", r.stderr
        assert "a downgrade" in one_line_error(r)
    with pytest.raises(ConfigTampered, match="version 2 key file"):
        Repository.open(backend, passphrase=PASSPHRASE, allow_legacy_v1=True)
    # every v2 key removed too: it looks like an old v1 repository
    for info in list(backend.list("keys/")):
        if info.key != v1_key:
            backend.delete(info.key)
    with pytest.raises(LegacyRefused, match="--legacy-v1 or FASTPATH_ALLOW_LEGACY_V1=1"):
        Repository.open(backend, passphrase=PASSPHRASE)
    new_state_dir(tmp_path, monkeypatch, "m2")
    r = fastpath("list", url, "--json", env=env)
    assert r.returncode == 1 and as_json(r)["exception"] == "LegacyRefused", r.stderr
    # the machine that pinned it as version 2 refuses it even with --legacy-v1
    monkeypatch.setenv("FASTPATH_STATE_DIR", pinned_here)
    r = fastpath("list", url, "--legacy-v1", "--json", env=env)
    assert r.returncode == 1 and as_json(r)["exception"] == "RepositoryChanged", r.stderr
    assert "format version went from 2 to 1" in one_line_error(r)
    backend.close()
    old.close()


def test_a_real_v1_repository_opens_only_when_asked_and_loudly(tmp_path):
    backend = _legacy_repo(tmp_path / "old")
    url = backend.url
    backend.close()
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    r = fastpath("list", url, "--json", env=env)
    assert r.returncode == 1 and as_json(r)["exception"] == "LegacyRefused"
    for extra, more_env in ((["--legacy-v1"], {}), ([], {"FASTPATH_ALLOW_LEGACY_V1": "1"})):
        r = fastpath("list", url, *extra, "--json", env={**env, **more_env})
        assert r.returncode == 0, r.stderr
        assert "WARNING" in r.stderr and "is authenticated" in r.stderr
    # the migration: copy into a new repository
    new = tmp_path / "new"
    pf_new = _pfile(tmp_path, "a new passphrase for the new repository")
    r = fastpath("repo", "init", new, "--encrypt", "--passphrase-file", pf_new, "--json")
    assert r.returncode == 0, r.stderr
    r = fastpath("copy", url, new, "--legacy-v1", "--dst-passphrase-file", pf_new, "--json",
                 env=env)  # fmt: skip
    assert r.returncode == 0 and as_json(r)["ok"], r.stderr


# -- F5: the error when the config's own key file is gone -------------------------------------


def test_missing_key_file_error_says_no_key_accepts_the_passphrase(tmp_path):
    url = tmp_path / "enc"
    Repository.init(url, encrypt=True, passphrase=PASSPHRASE).close()
    other = Repository.init(tmp_path / "other", encrypt=True, passphrase="attacker's own")
    (theirs,) = list(other.backend.list("keys/"))
    backend = open_backend(url)
    (ours,) = [i.key for i in backend.list("keys/")]
    backend.delete(ours)
    backend.put(theirs.key, other.backend.get(theirs.key))
    other.close()
    r = fastpath("list", url, "--json", env={"FASTPATH_PASSPHRASE": PASSPHRASE})
    assert r.returncode == 1 and as_json(r)["exception"] == "WrongPassphrase"
    err = one_line_error(r)
    assert "no key file of the repository" in err and "1 key file(s) tried" in err
    assert f"the config's key {ours} is missing" in err
    assert f"wrong passphrase for the repository key {backend.url}/{theirs.key}" not in err
    backend.close()


def test_backup_accepts_a_deliberate_change_when_told(tmp_path):
    """Re-created unencrypted on purpose: `backup vdi` refuses it until
    --accept-repository-change, which pins the new state."""
    url = tmp_path / "r"
    pf = _pfile(tmp_path)
    assert fastpath("repo", "init", url, "--encrypt", "--passphrase-file", pf).returncode == 0
    shutil.rmtree(url)
    Repository.init(url).close()  # e.g. by a script, not through this machine's CLI
    source = _raw_disk(tmp_path)
    cmd = ["backup", "vdi", "--source", source, "--repo", url, "--vdi", str(uuid.uuid4()),
           "--vm", VM, "--json"]  # fmt: skip
    r = fastpath(*cmd)
    assert r.returncode == 1 and as_json(r)["exception"] == "RepositoryChanged", r.stderr
    r = fastpath(*cmd, "--accept-repository-change")
    assert r.returncode == 0 and as_json(r)["ok"], r.stderr
    rec = json.loads(pins_file().read_text())["repositories"][str(url)]
    assert rec["encrypted"] is False and rec["version"] == 1
    assert fastpath(*cmd).returncode == 0
