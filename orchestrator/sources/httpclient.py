"""HTTP(S) GETs with certificate pinning by SHA-256 fingerprint (the agent's self-signed cert)."""

from __future__ import annotations

import hashlib
import http.client
import ssl
from urllib.parse import urlparse

from orchestrator.sources.base import SourceError, SourceUnavailable


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, fingerprint: str | None, cafile: str | None = None, **kw):
        if fingerprint:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # checked below against the pinned fingerprint
        else:
            ctx = ssl.create_default_context(cafile=cafile)
        super().__init__(host, port, context=ctx, **kw)
        self.fingerprint = fingerprint.lower().replace(":", "") if fingerprint else None

    def connect(self):
        super().connect()
        if self.fingerprint:
            der = self.sock.getpeercert(binary_form=True)
            got = hashlib.sha256(der or b"").hexdigest()
            if got != self.fingerprint:
                self.sock.close()
                raise SourceError(
                    f"https://{self.host}:{self.port}: certificate fingerprint {got} does not "
                    f"match the pinned {self.fingerprint} (refusing to connect)"
                )


def connect(url: str, fingerprint: str | None = None, timeout: float = 60.0, cafile=None):
    u = urlparse(url)
    if u.scheme == "https":
        return PinnedHTTPSConnection(
            u.hostname, u.port or 443, fingerprint, cafile=cafile, timeout=timeout
        )
    if u.scheme == "http":
        return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    raise SourceError(f"{url}: not an http(s) URL")


def get(url: str, path: str, *, fingerprint=None, headers=None, timeout=60.0, cafile=None):
    """(connection, response) for a GET; raises SourceError on a non-2xx status."""
    conn = connect(url, fingerprint, timeout, cafile=cafile)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
    except SourceError:
        conn.close()
        raise
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise SourceUnavailable(f"{url}: {exc}") from exc
    if resp.status // 100 != 2:
        body = resp.read(4096).decode("utf-8", "replace").strip()
        conn.close()
        raise SourceError(f"GET {path.split('?')[0]}: HTTP {resp.status}: {body[:300]}")
    return conn, resp
