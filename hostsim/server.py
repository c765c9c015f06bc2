"""XAPI's HTTP front: XML-RPC on POST / and the data paths (/export_raw_vdi, /import_raw_vdi).

Threaded (one thread per connection, HTTP/1.1 keep-alive, as the XenAPI SDK expects), optionally TLS.
The XML-RPC layer only translates: XapiError -> {"Status": "Failure", "ErrorDescription": [...]},
values -> {"Status": "Success", "Value": wire(value)}.
"""

import http.server
import logging
import socket
import socketserver
import ssl
import threading
import urllib.parse
import xmlrpc.client

from hostsim import errors as E
from hostsim.api import wire
from hostsim.errors import XapiError

log = logging.getLogger("hostsim.server")

MAX_XMLRPC_BODY = 16 << 20


def success(value):
    return {"Status": "Success", "Value": value}


def failure(description):
    return {"Status": "Failure", "ErrorDescription": description}


def handle_xmlrpc(api, body):
    """Bytes of an XML-RPC methodCall -> bytes of the methodResponse (never raises)."""
    try:
        params, method = xmlrpc.client.loads(body, use_builtin_types=True)
    except Exception as e:
        fault = xmlrpc.client.Fault(1, "cannot parse XML-RPC request: %s" % e)
        return xmlrpc.client.dumps(fault, methodresponse=True).encode()
    try:
        value = api.call(method, list(params))
        out = wire(value)
        if method in ("event.from", "event_from") and isinstance(value, dict):
            out["valid_ref_counts"] = value["valid_ref_counts"]  # Int32 in XAPI, not int64
        response = success(out)
    except XapiError as e:
        response = failure(e.description)
    except Exception as e:
        log.exception("internal error in %s", method)
        response = failure([E.INTERNAL_ERROR, repr(e)])
    return xmlrpc.client.dumps((response,), methodresponse=True, allow_none=True).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hostsim-xapi"
    # Headers and body go out in two writes: with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per XAPI call, ~2 s per backup command) - a stall real XAPI does not
    # have, which would be charged to every transport's fixed costs.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # quiet by default
        log.debug("%s %s", self.address_string(), fmt % args)

    @property
    def host(self):
        return self.server.host

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path not in ("/", "/RPC2", "/xmlrpc"):
            return self.send_error(404)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_XMLRPC_BODY:
            return self.send_error(413)
        body = self.rfile.read(length)
        out = handle_xmlrpc(self.server.api, body)
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def _query(self):
        url = urllib.parse.urlsplit(self.path)
        return url.path, dict(urllib.parse.parse_qsl(url.query))

    def do_GET(self):
        path, query = self._query()
        handler = self.server.get_routes.get(path)
        if handler is None:
            return self.send_error(404)
        handler(self, query)

    def do_PUT(self):
        path, query = self._query()
        handler = self.server.put_routes.get(path)
        if handler is None:
            return self.send_error(404)
        handler(self, query)


class XapiHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, api, ssl_context=None):
        super().__init__(address, Handler)
        self.api = api
        self.ssl_context = ssl_context
        self.get_routes = {}
        self.put_routes = {}
        self.thread = None
        self._conns = set()
        self._conns_lock = threading.Lock()

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
            sock.settimeout(30)
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError):
                sock.close()
                raise
            sock.settimeout(None)
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().close_request(request)

    @property
    def url(self):
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        scheme = "https" if self.ssl_context is not None else "http"
        return "%s://%s:%d/" % (scheme, host, port)

    def start(self):
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="xapi-http", daemon=True
        )
        self.thread.start()
        return self

    def stop(self):
        """Stop accepting and cut every open connection (as a XAPI restart would)."""
        self.shutdown()
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def check_session(api, query):
    """session_id from the query string (XAPI's HTTP handlers); XapiError if invalid."""
    ref = query.get("session_id", "")
    api._session(ref)
    return ref
