"""Connecting to XAPI for the backup and restore jobs (URL and credentials from the command line,
the environment, or a running hostsim's ``hostsim.json``)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from orchestrator.cliutil import UsageError


@dataclass
class XapiTarget:
    url: str
    user: str
    password: str
    cafile: str | None = None


def add_xapi_arguments(p, *, required_flag: str = "--xapi") -> None:
    p.add_argument(
        required_flag,
        dest="xapi",
        metavar="URL",
        help="XAPI URL of the pool master (default: $FASTPATH_XAPI_URL or hostsim.json)",
    )
    p.add_argument("--user", help="XAPI user (default $FASTPATH_XAPI_USER, root)")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the XAPI password from FILE's first line (default $FASTPATH_XAPI_PASSWORD)",
    )
    p.add_argument(
        "--password",
        help="XAPI password; avoid: argv is readable by every local user (warns), prefer "
        "--password-file or $FASTPATH_XAPI_PASSWORD",
    )
    p.add_argument(
        "--xapi-cafile",
        metavar="PEM",
        help="CA (or the pool's own certificate) to verify an https:// XAPI with",
    )
    p.add_argument(
        "--hostsim",
        metavar="DIR",
        help="take URL and credentials from DIR/hostsim.json (default $HOSTSIM_ROOT)",
    )


PASSWORD_ARGV_WARNING = (
    "warning: --password puts the XAPI password in the process list, readable by every local "
    "user; use --password-file FILE or $FASTPATH_XAPI_PASSWORD"
)


def read_password_file(path: str) -> str:
    """The first line of ``path`` without its line end (a one-line error when unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as exc:
        raise UsageError(f"--password-file {path}: {exc.strerror or exc}") from None
    return line.rstrip("\r\n")


def resolve_target(args) -> XapiTarget:
    url = args.xapi or os.environ.get("FASTPATH_XAPI_URL")
    user = args.user or os.environ.get("FASTPATH_XAPI_USER")
    password_file = getattr(args, "password_file", None)
    if password_file and args.password:
        raise UsageError("give --password-file or --password, not both")
    if args.password:
        print(PASSWORD_ARGV_WARNING, file=sys.stderr)
    if password_file:
        password = read_password_file(password_file)
    else:
        password = args.password or os.environ.get("FASTPATH_XAPI_PASSWORD")
    cafile = getattr(args, "xapi_cafile", None)
    root = getattr(args, "hostsim", None) or os.environ.get("HOSTSIM_ROOT")
    if root and (not url or user is None or password is None):
        path = os.path.join(root, "hostsim.json")
        try:
            with open(path) as f:
                info = json.load(f)["xapi"]
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None
        url = url or info["url"]
        user = user or info["user"]
        password = password if password is not None else info["password"]
        cafile = cafile or info.get("cafile")
    if not url:
        raise UsageError("no XAPI URL: give --xapi URL (or $FASTPATH_XAPI_URL, --hostsim DIR)")
    if password is None:
        raise UsageError("no XAPI password: --password-file FILE or $FASTPATH_XAPI_PASSWORD")
    return XapiTarget(url, user or "root", password, cafile)


def ssl_context(target: XapiTarget):
    import ssl

    if not target.url.startswith("https:"):
        return None
    return ssl.create_default_context(cafile=target.cafile)


def connect(target: XapiTarget):
    import xmlrpc.client

    import XenAPI

    ctx = ssl_context(target)
    transport = xmlrpc.client.SafeTransport(context=ctx) if ctx is not None else None
    session = XenAPI.Session(target.url, transport=transport)
    try:
        session.xenapi.login_with_password(target.user, target.password, "2.21", "fastpath")
    except XenAPI.Failure as exc:
        raise ConnectionError(f"XAPI {target.url}: login failed: {exc.details}") from None
    except OSError as exc:
        raise ConnectionError(f"XAPI {target.url}: {exc}") from None
    return session


def logout(session) -> None:
    try:
        session.xenapi.session.logout()
    except Exception:
        pass


def failure_code(exc) -> str:
    details = getattr(exc, "details", None) or []
    return str(details[0]) if details else type(exc).__name__
