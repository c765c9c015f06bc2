"""The `fastpath` command, run as a subprocess with --json: results, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from orchestrator.repo.codec import chunk_key
from orchestrator.repo.errors import RepoError
from orchestrator.repo.repository import Repository
from tests.repo_ops.conftest import PASSPHRASE
from tests.repo_ops.helpers import DiskModel, backup


def fastpath(*args, env=None, input=None, timeout=60):
    full_env = {**os.environ, "FASTPATH_INSECURE_TEST_KDF_N": "1024"}
    full_env.pop("FASTPATH_PASSPHRASE", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=timeout,
    )
    return proc


def as_json(proc):
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0])


def one_line_error(proc):
    err = [line for line in proc.stderr.splitlines() if line.startswith("fastpath")]
    assert len(err) == 1, proc.stderr
    return err[0]


@pytest.fixture
def populated(tmp_path):
    url = tmp_path / "repo"
    repo = Repository.init(url)
    ids = []
    for n in range(2):
        vm = str(uuid.UUID(int=n + 1))
        disk = DiskModel(chunks=1, tail=4096, seed=n)
        disk.write_chunk(0, seed=5)  # shared by both VMs
        disk.write_chunk(1, seed=n)
        keys = None
        for gen in range(2):
            disk.write_chunk(1, seed=100 * n + gen)
            rid, keys = backup(repo, vm, [disk], bases=keys)
            ids.append(rid)
    repo.close()
    return url, ids


def test_repo_init_and_errors(tmp_path):
    url = tmp_path / "new"
    r = fastpath("repo", "init", url, "--json")
    assert r.returncode == 0, r.stderr
    doc = as_json(r)
    assert doc["ok"] and doc["encrypted"] is False and doc["chunk_size"] == 2 * 1024 * 1024
    again = fastpath("repo", "init", url, "--json")
    assert again.returncode == 1 and not as_json(again)["ok"]
    assert "already exists" in one_line_error(again)
    missing = fastpath("list", tmp_path / "nowhere")
    assert missing.returncode == 1 and "no repository" in one_line_error(missing)


def test_repo_init_refuses_a_path_whose_parent_is_missing(tmp_path):
    """An unmounted NAS (/mnt/nas/backups with nothing at /mnt/nas) must not get a repository
    on the local disk: the parent must exist, only the last component is created."""
    url = tmp_path / "nas" / "backups" / "repo"
    r = fastpath("repo", "init", url, "--json")
    assert r.returncode == 1 and not as_json(r)["ok"]
    error = one_line_error(r)
    assert f"its parent directory {url.parent} does not exist" in error, error
    assert not (tmp_path / "nas").exists()
    r = fastpath("repo", "init", f"file://{url}", "--json")
    assert r.returncode == 1 and not (tmp_path / "nas").exists()
    (tmp_path / "nas" / "backups").mkdir(parents=True)  # mounted now
    assert as_json(fastpath("repo", "init", url, "--json"))["ok"]


def test_usage_errors_exit_2(populated):
    url, _ = populated
    assert fastpath().returncode == 2
    assert fastpath("frobnicate").returncode == 2
    r = fastpath("prune", url)  # no retention rule
    assert r.returncode == 2 and "keep something" in one_line_error(r)
    assert fastpath("verify", url, "--sample", "0").returncode == 2
    assert fastpath("worker", "--concurrency", "0", url).returncode == 2


def test_list_show_stats(populated):
    url, ids = populated
    listing = as_json(fastpath("list", url, "--json"))
    assert [p["id"] for p in listing["restore_points"]] == sorted(ids)
    latest = as_json(fastpath("show", url, "latest", "--json"))
    assert latest["id"] == max(ids, key=lambda i: i.split("/")[1])
    assert latest["disks"][0]["index"].endswith(".index")
    one = as_json(fastpath("show", url, ids[0], "--json"))
    assert one["id"] == ids[0] and one["metadata"] == {"test": True}
    vm_latest = as_json(fastpath("show", url, f"{ids[0].split('/')[0]}/latest", "--json"))
    assert vm_latest["id"] == ids[1]
    bad = fastpath("show", url, "nope/20260101T000000.000000Z", "--json")
    assert bad.returncode == 1 and "no restore point" in as_json(bad)["error"]
    stats = as_json(fastpath("stats", url, "--json"))
    assert stats["restore_points"] == 4 and stats["vms"] == 2
    assert stats["dedup_ratio"] > 1 and stats["chunks"] == stats["chunks_referenced"]
    human = fastpath("list", url)
    assert human.returncode == 0 and ids[0] in human.stdout


def test_prune_gc_verify_check(populated):
    url, ids = populated
    dry = as_json(fastpath("prune", url, "--keep-last", "1", "--dry-run", "--json"))
    assert sorted(dry["deleted"]) == sorted([ids[0], ids[2]]) and dry["objects_deleted"] == 0
    done = as_json(fastpath("prune", url, "--keep-last", "1", "--json"))
    assert done["objects_deleted"] == 4
    gc = as_json(fastpath("gc", url, "--margin", "0", "--json"))
    assert gc["chunks_deleted"] == 2  # each VM's old version of chunk 1
    ok = fastpath("verify", url, "--json")
    assert ok.returncode == 0 and as_json(ok)["ok"]
    # damage a chunk both remaining restore points share
    repo = Repository.open(url)
    shared = repo.codec.digest(DiskModel(chunks=1, tail=4096).length(0) and _chunk5())
    path = os.path.join(str(url), *chunk_key(shared).split("/"))
    repo.close()
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    bad = fastpath("verify", url, "--json")
    assert bad.returncode == 1
    doc = as_json(bad)
    assert sorted(doc["affected_restore_points"]) == sorted([ids[1], ids[3]])
    assert fastpath("check", url, "--json").returncode == 0  # structure is intact
    os.unlink(path)
    chk = fastpath("check", url, "--json")
    assert chk.returncode == 1 and as_json(chk)["missing_chunks"] == [shared.hex()]
    human = fastpath("verify", url)
    assert human.returncode == 1 and "affected restore point" in human.stdout


def _chunk5():
    from orchestrator.repo.codec import CHUNK_SIZE
    from tests.repo_ops.helpers import chunk_bytes

    return chunk_bytes(5, CHUNK_SIZE)


def test_encrypted_repository_passphrase_sources(tmp_path):
    url = tmp_path / "enc"
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    r = fastpath("repo", "init", url, "--encrypt", "--json", env=env)
    assert r.returncode == 0 and as_json(r)["encrypted"] is True
    assert fastpath("list", url, "--json", env=env).returncode == 0
    pfile = tmp_path / "pass"
    pfile.write_text(PASSPHRASE + "\n")
    assert fastpath("list", url, "--passphrase-file", pfile, "--json").returncode == 0
    wrong = fastpath("list", url, "--json", env={"FASTPATH_PASSPHRASE": "nope"})
    assert wrong.returncode == 1 and "passphrase" in one_line_error(wrong).lower()
    none = fastpath("verify", url, "--json", input="")  # needs the key, stdin is no TTY
    assert none.returncode == 1 and "passphrase" in one_line_error(none).lower()


def test_progress_as_json_lines_on_stderr(populated):
    url, _ = populated
    r = fastpath("verify", url, "--json")
    events = [json.loads(line) for line in r.stderr.splitlines()]
    assert {"start", "end"} <= {e["event"] for e in events}
    assert any(e.get("task") == "verify chunks" for e in events)
    lines = fastpath("verify", url, "--progress", "lines")
    assert "verify chunks: started" in lines.stderr


def test_cli_on_s3(s3_env):
    """The same commands on s3://bucket/prefix (endpoint and credentials from the environment,
    as the AWS configuration chain provides them)."""
    url = s3_env.url
    r = fastpath("repo", "init", url, "--json", env=s3_env.env)
    assert r.returncode == 0, r.stderr
    repo = Repository.open(url)
    disk = DiskModel(chunks=1, tail=4096, seed=3)
    disk.write_chunk(0, seed=1)
    disk.write_chunk(1, seed=2)
    rid, _ = backup(repo, str(uuid.UUID(int=77)), [disk])
    repo.close()
    listing = as_json(fastpath("list", url, "--json", env=s3_env.env))
    assert [p["id"] for p in listing["restore_points"]] == [rid]
    assert as_json(fastpath("verify", url, "--json", env=s3_env.env))["chunks_checked"] == 2
    assert as_json(fastpath("gc", url, "--json", env=s3_env.env))["chunks_deleted"] == 0
    missing = fastpath("list", "s3://no-such-bucket-fastpath/x", "--json", env=s3_env.env)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_metadata_commands_work_on_an_encrypted_repo_without_passphrase(tmp_path):
    url = tmp_path / "enc"
    repo = Repository.init(url, encrypt=True, passphrase=PASSPHRASE)
    disk = DiskModel(chunks=1, seed=8)
    vm = str(uuid.UUID(int=8))
    for gen in range(2):
        disk.write_chunk(0, seed=80 + gen)
        rid, _ = backup(repo, vm, [disk])
    repo.close()
    for command in ("list", "show"):  # restore point documents are encrypted: need the key
        r = fastpath(command, url, *(["latest"] if command == "show" else []), "--json")
        assert r.returncode == 1 and as_json(r)["exception"] == "PassphraseRequired"
        assert f"{command} needs its passphrase" in one_line_error(r)
    env = {"FASTPATH_PASSPHRASE": PASSPHRASE}
    listing = as_json(fastpath("list", url, "--json", env=env))["restore_points"]
    assert listing[-1]["id"] == rid and listing[-1]["kind"] == "full"
    assert as_json(fastpath("stats", url, "--json"))["encrypted"] is True
    assert as_json(fastpath("prune", url, "--keep-last", "1", "--json"))["objects_deleted"] == 2
    assert as_json(fastpath("gc", url, "--margin", "0", "--json"))["chunks_deleted"] == 1
    assert fastpath("check", url, "--json").returncode == 0
    no_key = fastpath("verify", url, "--json")  # reading chunks needs the key
    assert no_key.returncode == 1 and "passphrase" in one_line_error(no_key).lower()
    wrong = fastpath("gc", url, "--json", env={"FASTPATH_PASSPHRASE": "wrong"})
    assert wrong.returncode == 1  # a passphrase that is given is still checked
    keyless = Repository.open(url, need_key=False)
    with pytest.raises(RepoError, match="passphrase"):
        keyless.begin_backup(vm)
    assert not list(keyless.backend.list("locks/writers/"))
    keyless.close()


def test_init_with_a_fast_zstd_level_backs_up_and_restores(tmp_path):
    """`repo init --compression zstd:-5` (a zstd fast level): the chunks are compressed with it,
    and a disk backed up from a VHD that qemu-img wrote restores to qemu-img's own reading."""
    raw = tmp_path / "disk.raw"
    text = b"".join(b"line %d of a log file, status=ok\n" % i for i in range(60000))
    raw.write_bytes(text[: 3 << 20] + bytes(1 << 20) + os.urandom(1 << 20) + text[: 1 << 20])
    vhd = tmp_path / "disk.vhd"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, vhd],
        check=True,
        timeout=60,
    )
    url = tmp_path / "repo"
    doc = as_json(fastpath("repo", "init", url, "--compression", "zstd:-5", "--json"))
    assert doc["compression"] == "zstd:-5"
    b = fastpath("backup", "vdi", "--source", vhd, "--repo", url, "--vdi", str(uuid.uuid4()),
                 "--vm", str(uuid.UUID(int=9)), "--json")  # fmt: skip
    assert b.returncode == 0, b.stderr
    rp = as_json(b)["id"]
    stats = as_json(fastpath("stats", url, "--json"))
    assert stats["compression"] == "zstd:-5" and stats["compression_ratio"] > 1.5, stats
    out = tmp_path / "restored.raw"
    r = fastpath("restore", url, rp, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    expected = subprocess.run(
        ["qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, tmp_path / "q.raw"],
        check=True,
        timeout=60,
    )
    assert expected.returncode == 0
    assert out.read_bytes()[: raw.stat().st_size] == raw.read_bytes()
    assert out.read_bytes() == (tmp_path / "q.raw").read_bytes()


@pytest.mark.parametrize("spec", ["zstd:0", "zstd:23", "zstd:-101", "lz4", "zstd:x"])
def test_init_refuses_an_unknown_compression(tmp_path, spec):
    r = fastpath("repo", "init", tmp_path / "r", "--compression", spec)
    assert r.returncode == 2 and "--compression" in one_line_error(r), r.stderr
    assert not (tmp_path / "r").exists()
