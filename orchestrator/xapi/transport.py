"""Blocking XML-RPC calls to XAPI: status envelopes -> values or XapiError, TLS with optional pinning.

One xmlrpc.client.ServerProxy per thread (they are not thread-safe); the asyncio client runs these calls
in executor threads.
"""

import hashlib
import http.client
import socket
import ssl
import threading
import urllib.parse
import xmlrpc.client


class XapiError(Exception):
    """A XAPI failure: details = [code, *params] (ErrorDescription)."""

    def __init__(self, details):
        details = [str(d) for d in (details or ["UNKNOWN_ERROR"])]
        self.details = details
        self.code = details[0]
        self.params = details[1:]
        super().__init__(" ".join(details))


class XapiTlsError(ssl.SSLError):
    """The server's certificate does not match the pinned fingerprint."""


class XapiConnectionError(OSError):
    """XAPI could not be reached (refused, reset, timeout, protocol garbage)."""


def cert_fingerprint(der):
    return hashlib.sha256(der).hexdigest()


def _normalize_fp(fp):
    return fp.replace(":", "").strip().lower()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, pin=None, **kw):
        super().__init__(*args, **kw)
        self._pin = pin

    def connect(self):
        super().connect()
        if self._pin is not None:
            der = self.sock.getpeercert(binary_form=True)
            got = cert_fingerprint(der or b"")
            if got != self._pin:
                self.sock.close()
                raise XapiTlsError(
                    "certificate fingerprint %s does not match the pinned %s" % (got, self._pin)
                )


class _Transport(xmlrpc.client.SafeTransport):
    def __init__(self, context, pin, timeout, https):
        super().__init__(context=context)
        self._pin = pin
        self._timeout = timeout
        self._https = https

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        chost, self._extra_headers, _x509 = self.get_host_info(host)
        if self._https:
            conn = _PinnedHTTPSConnection(
                chost, timeout=self._timeout, context=self.context, pin=self._pin
            )
        else:
            conn = http.client.HTTPConnection(chost, timeout=self._timeout)
        self._connection = host, conn
        return conn


class Transport:
    """Calls methods on one XAPI URL. `call` returns the Value or raises XapiError."""

    def __init__(self, url, verify=True, cafile=None, fingerprint=None, timeout=120.0):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.pin = _normalize_fp(fingerprint) if fingerprint else None
        self.timeout = timeout
        if self.https:
            if self.pin is not None or not verify:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx = ssl.create_default_context(cafile=cafile)
            self.context = ctx
        else:
            self.context = None
        self._local = threading.local()

    def _proxy(self):
        p = getattr(self._local, "proxy", None)
        if p is None:
            t = _Transport(self.context, self.pin, self.timeout, self.https)
            p = xmlrpc.client.ServerProxy(self.url, transport=t, allow_none=True)
            self._local.proxy = p
        return p

    def call(self, method, *params):
        try:
            result = getattr(self._proxy(), method)(*params)
        except XapiTlsError:
            self._local.proxy = None
            raise
        except (
            OSError,
            http.client.HTTPException,
            xmlrpc.client.ProtocolError,
            socket.timeout,
        ) as e:
            self._local.proxy = None
            raise XapiConnectionError("%s: %s: %s" % (self.url, method, e)) from e
        except xmlrpc.client.Fault as e:
            raise XapiError(["XMLRPC_FAULT", str(e.faultCode), e.faultString]) from e
        if not isinstance(result, dict) or "Status" not in result:
            raise XapiError(["MALFORMED_RESPONSE", method])
        if result["Status"] == "Success":
            return result.get("Value")
        raise XapiError(result.get("ErrorDescription") or ["UNKNOWN_ERROR", method])
