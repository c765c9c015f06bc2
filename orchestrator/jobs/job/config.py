"""The job file: TOML (read with ``tomllib``) parsed into a :class:`JobConfig`, every key
checked; an unknown key or a wrong type is a one-line UsageError naming the key and, when it
can be found, ``file:line``. See docs/jobs.md for the format.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field

from orchestrator.cliutil import UsageError
from orchestrator.jobs.prune import RULES, RetentionPolicy
from orchestrator.sources import TRANSPORTS

KEEP_RULES = RULES  # keep-last, keep-hourly, ... keep-yearly: the same rules as `fastpath prune`

TOP = {
    "name": str,
    "repository": str,
    "passphrase-file": str,
    "xapi": str,
    "user": str,
    "password-file": str,
    "xapi-cafile": str,
    "vms": list,
    "tags": list,
    "pools": str,
    "exclude": list,
    "transport": str,
    "cbt": bool,
    "full-every": int,
    "fallback-is-failure": bool,
    "max-vms": int,
    "max-per-host": int,
    "retention": dict,
    "copy-to": list,
    "copy-passphrase-file": str,
    "copy-allow-plaintext": bool,
    "timeouts": dict,
    "report": dict,
}
RETENTION = {f"keep-{r}": int for r in KEEP_RULES}
TIMEOUTS = {"io": (int, float)}
REPORT = {"webhook": str, "textfile": str, "webhook-retries": int}


@dataclass
class JobConfig:
    path: str
    name: str
    repository: str
    passphrase_file: str | None = None
    xapi: str | None = None
    user: str | None = None
    password_file: str | None = None
    xapi_cafile: str | None = None
    vms: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    all_vms: bool = False
    exclude: list[str] = field(default_factory=list)
    transport: str = "auto"
    cbt: bool = False
    full_every: int = 0
    fallback_is_failure: bool = False
    max_vms: int = 2
    max_per_host: int = 1
    retention: dict[str, int] = field(default_factory=dict)
    io_timeout: float = 60.0
    webhook: str | None = None
    webhook_retries: int = 3
    textfile: str | None = None
    copy_to: list[str] = field(default_factory=list)
    copy_passphrase_file: str | None = None
    copy_allow_plaintext: bool = False  # copy-to an unencrypted repository from an encrypted one

    def policy(self) -> RetentionPolicy | None:
        """The retention as a RetentionPolicy ,
        None when the job has no retention."""
        if not self.retention:
            return None
        kw = {f"keep_{r}": self.retention.get(f"keep-{r}", 0) for r in KEEP_RULES}
        if not any(kw.values()):
            return None
        return RetentionPolicy(**kw)


def _where(path: str, text: str, key: str, section: str | None) -> str:
    """``file:line`` of ``key`` (in ``[section]`` when given), or just ``file``."""
    current = None
    pat = re.compile(r"^\s*(?:\"%s\"|'%s'|%s)\s*=" % ((re.escape(key),) * 3))
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if m:
            current = m.group(1).strip("\"'")
            continue
        if current == section and pat.match(line):
            return f"{path}:{n}"
    return path


def _check(path, text, table, schema, section=None) -> None:
    for key, value in table.items():
        name = f"{section}.{key}" if section else key
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise UsageError(
                f"{_where(path, text, key, section)}: unknown key {name!r} (known: {known})"
            )
        want = schema[key]
        if (
            isinstance(value, bool)
            and want is not bool
            and bool not in (want if isinstance(want, tuple) else (want,))
        ):
            ok = False
        else:
            ok = isinstance(value, want)
        if not ok:
            kind = want.__name__ if isinstance(want, type) else "number"
            raise UsageError(f"{_where(path, text, key, section)}: {name} must be a {kind}")
        if want is list and not all(isinstance(v, str) and v for v in value):
            raise UsageError(
                f"{_where(path, text, key, section)}: {name} must be a list of strings"
            )
        if want is int and value < 0:
            raise UsageError(f"{_where(path, text, key, section)}: {name} must be >= 0")


def load_job(path: str) -> JobConfig:
    """Read and validate the job file ``path``; UsageError (one line) on any problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read job file {path}: {exc.strerror}") from None
    text = raw.decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not a valid TOML job file: {exc}") from None
    _check(path, text, data, TOP)
    for section, schema in (("retention", RETENTION), ("timeouts", TIMEOUTS), ("report", REPORT)):
        _check(path, text, data.get(section, {}), schema, section)
    for required in ("name", "repository"):
        if not data.get(required):
            raise UsageError(f"{path}: missing {required!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", data["name"]):
        raise UsageError(f"{_where(path, text, 'name', None)}: name must be [A-Za-z0-9_.-]")
    pools = data.get("pools")
    if pools is not None and pools != "all":
        raise UsageError(f'{_where(path, text, "pools", None)}: pools must be "all"')
    if not (data.get("vms") or data.get("tags") or pools):
        raise UsageError(f'{path}: selects no VMs: give vms, tags or pools = "all"')
    transport = data.get("transport", "auto")
    if transport != "auto" and transport not in TRANSPORTS:
        raise UsageError(
            f"{_where(path, text, 'transport', None)}: unknown transport {transport!r} "
            f"(one of auto, {', '.join(TRANSPORTS)})"
        )
    for key in ("max-vms", "max-per-host"):
        if key in data and data[key] < 1:
            raise UsageError(f"{_where(path, text, key, None)}: {key} must be >= 1")
    retention = data.get("retention", {})
    if retention and not any(retention.values()):
        raise UsageError(f"{path}: [retention] must keep something (e.g. keep-last = 1)")
    base = os.path.dirname(os.path.abspath(path))

    def rel(p):
        return None if p is None else os.path.join(base, os.path.expanduser(p))

    repo = data["repository"]
    if "://" not in repo:
        repo = rel(repo)
    timeouts = data.get("timeouts", {})
    report = data.get("report", {})
    return JobConfig(
        path=os.path.abspath(path),
        name=data["name"],
        repository=repo,
        passphrase_file=rel(data.get("passphrase-file")),
        xapi=data.get("xapi"),
        user=data.get("user"),
        password_file=rel(data.get("password-file")),
        xapi_cafile=rel(data.get("xapi-cafile")),
        vms=list(data.get("vms", [])),
        tags=list(data.get("tags", [])),
        all_vms=pools == "all",
        exclude=list(data.get("exclude", [])),
        transport=transport,
        cbt=data.get("cbt", False),
        full_every=data.get("full-every", 0),
        fallback_is_failure=data.get("fallback-is-failure", False),
        max_vms=data.get("max-vms", 2),
        max_per_host=data.get("max-per-host", 1),
        retention=dict(retention),
        io_timeout=float(timeouts.get("io", 60.0)),
        webhook=report.get("webhook"),
        webhook_retries=report.get("webhook-retries", 3),
        textfile=rel(report.get("textfile")),
        copy_to=[t if "://" in t else rel(t) for t in data.get("copy-to", [])],
        copy_passphrase_file=rel(data.get("copy-passphrase-file")),
        copy_allow_plaintext=data.get("copy-allow-plaintext", False),
    )
