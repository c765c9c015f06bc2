"""The ``fastpath`` command's shared contract, checked on every command the parser knows:
with ``--json`` every error is one document of one shape on stdout (``error_document``), exit
codes are 2 for usage and 1 for operational failures, and the XAPI password stays out of argv."""

from __future__ import annotations

import argparse
import json

import pytest

from orchestrator.cli import build_parser, main
from orchestrator.cliutil import UsageError
from orchestrator.jobs import xapi_session
from orchestrator.repo.repository import Repository

SCHEMA = {"ok", "error", "type", "exception", "exit_code"}


def leaf_commands() -> list[tuple[str, ...]]:
    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, prefix + (name,))
                return
        yield prefix

    return list(walk(build_parser(), ()))


def run(capsys, argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # one document, nothing else on stdout
    return code, json.loads(lines[0]), err


def check_error(doc, kind, code):
    assert SCHEMA <= set(doc), doc
    assert doc["ok"] is False and doc["type"] == kind and doc["exit_code"] == code
    assert isinstance(doc["error"], str) and doc["error"] and "\n" not in doc["error"]


def test_the_parser_knows_the_commands_of_the_readme():
    names = {" ".join(c) for c in leaf_commands()}
    assert {"repo init", "list", "show", "backup vm", "backup vdi", "restore", "verify"} <= names


@pytest.mark.parametrize("command", leaf_commands(), ids=" ".join)
def test_a_usage_error_is_the_error_document_on_every_command(capsys, command):
    code, doc, err = run(capsys, [*command, "--json", "--no-such-option"])
    assert code == 2
    check_error(doc, "usage", 2)
    assert "--no-such-option" in doc["error"] or "required" in doc["error"]
    assert "usage:" in err  # people still get argparse's usage line on stderr


REPO_COMMANDS = [
    ["list", "{missing}"],
    ["show", "{missing}", "latest"],
    ["stats", "{missing}"],
    ["gc", "{missing}"],
    ["prune", "{missing}", "--keep-last", "1"],
    ["restore", "{missing}", "latest", "-o", "{tmp}/out.raw"],
    ["verify", "{missing}"],
    ["check", "{missing}"],
]


@pytest.mark.parametrize("argv", REPO_COMMANDS, ids=lambda a: a[0])
def test_an_operational_error_is_the_same_document(capsys, tmp_path, argv):
    values = {"missing": str(tmp_path / "no-repo"), "tmp": str(tmp_path)}
    code, doc, err = run(capsys, [a.format(**values) for a in argv] + ["--json"])
    assert code == 1
    check_error(doc, "failed", 1)
    assert doc["exception"] == "RepoNotFound" and "no-repo" in doc["error"]
    assert err.count("\n") == 1 and "no-repo" in err  # one line for people too


def test_a_missing_point_names_itself_in_the_document(capsys, tmp_path):
    Repository.init(str(tmp_path / "r")).close()
    code, doc, _ = run(capsys, ["show", str(tmp_path / "r"), "latest", "--json"])
    assert code == 1
    check_error(doc, "failed", 1)
    assert "restore point" in doc["error"]


def test_a_usage_error_raised_by_a_command_is_the_same_document(capsys, tmp_path):
    code, doc, _ = run(
        capsys, ["repo", "init", str(tmp_path / "r"), "--compression", "lz4", "--json"]
    )
    assert code == 2
    check_error(doc, "usage", 2)
    assert doc["exception"] == "UsageError" and "--compression" in doc["error"]


def test_backup_vdi_names_the_option_whose_uuid_is_bad(capsys, tmp_path):
    Repository.init(str(tmp_path / "r")).close()
    argv = ["backup", "vdi", "--source", str(tmp_path / "x.vhd"), "--repo", str(tmp_path / "r")]
    code, doc, _ = run(capsys, argv + ["--vdi", "disk0", "--json"])
    assert code == 2
    check_error(doc, "usage", 2)
    assert doc["error"].startswith("--vdi 'disk0' is not a UUID")


def _xapi_args(**kw):
    base = {"xapi": "http://127.0.0.1:1", "user": None, "password": None, "password_file": None}
    return argparse.Namespace(**{**base, **kw})


def test_password_in_argv_warns(capsys, monkeypatch):
    monkeypatch.delenv("FASTPATH_XAPI_PASSWORD", raising=False)
    target = xapi_session.resolve_target(_xapi_args(password="s3cret"))
    assert target.password == "s3cret"
    err = capsys.readouterr().err
    assert "--password-file" in err and "s3cret" not in err


def test_password_file_and_environment_do_not_warn(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("FASTPATH_XAPI_PASSWORD", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("from file\nsecond line ignored\n")
    assert xapi_session.resolve_target(_xapi_args(password_file=str(pw))).password == "from file"
    monkeypatch.setenv("FASTPATH_XAPI_PASSWORD", "from env")
    assert xapi_session.resolve_target(_xapi_args()).password == "from env"
    assert capsys.readouterr().err == ""


def test_password_file_errors_are_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTPATH_XAPI_PASSWORD", raising=False)
    with pytest.raises(UsageError, match=r"^--password-file .*missing: No such file"):
        xapi_session.resolve_target(_xapi_args(password_file=str(tmp_path / "missing")))
    with pytest.raises(UsageError, match="not both"):
        xapi_session.resolve_target(_xapi_args(password="a", password_file=str(tmp_path)))
    with pytest.raises(UsageError, match="--password-file FILE or"):
        xapi_session.resolve_target(_xapi_args())
