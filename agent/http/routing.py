"""Routing and tickets: which view answers a request, with which ticket, on which open export.

connection.Connection builds one Handler per request and calls dispatch(): /healthz and /metrics go
straight to their views, DELETE /v1/exports/<ticket> revokes the ticket, and every other
/v1/exports/<ticket>[/<what>] path goes through with_export(): the ticket comes from the path or
"Authorization: Bearer" (ticket_id), the gate checks it (gate.TicketGate), the store bounds the
requests running on it (acquire / release), the export is opened (or reused from the connection's
keep-alive cache) and wrapped as an exportview.ExportView, and the view function of EXPORT_VIEWS
runs with this Handler. Views call check_live() between blocks (ticket still valid, agent not
stopping, chain unchanged) and record() to count what they sent. A failure to open an export, or
the export's own refusal, becomes an HTTP error by _export_error().
"""

import logging

from agent.http import protocol as hp
from agent.http import views
from agent.http.exportview import export_view
from agent.http.gate import map_ticket_error, ticket_attr
from agent.http.response import ClientGone
from agent.tickets import log_id

log = logging.getLogger("fastpath.http")

# /v1/exports/<ticket>/<what> -> the view answering it (a function of the Handler, in views.py).
EXPORT_VIEWS = {
    "": views.info,
    "extents": views.extents,
    "vhd": views.vhd,
    "raw": views.raw,
    "blocks": views.blocks,
}


class Handler(object):
    """One request on its way to a view: req and resp, then (for an export) ticket and view."""

    def __init__(self, server, conn, req, resp):
        self.server = server
        self.conn = conn
        self.req = req
        self.resp = resp

    def dispatch(self):
        req = self.req
        if req.method == "DELETE":
            return self.revoke()
        if req.method not in ("GET", "HEAD"):
            raise hp.RequestError(
                "method %s not allowed" % req.method,
                status=405,
                code="method_not_allowed",
                headers=[("Allow", "GET, HEAD, DELETE" if self._export_root() else "GET, HEAD")],
            )
        path = req.path
        if path == "/healthz":
            return views.health(self)
        if path == "/metrics":
            return views.metrics(self)
        export = self._export_path()
        if export is not None:
            ticket, what = export
            action = EXPORT_VIEWS.get(what)
            if action is None:
                raise hp.RequestError("no such resource", status=404, code="not_found")
            return self.with_export(ticket, action)
        raise hp.RequestError("no such resource", status=404, code="not_found")

    def _export_path(self):
        """(ticket, sub-resource) of /v1/exports/<ticket>[/<what>][/], what "" for the export
        itself and None for a deeper path; None for a path outside /v1/exports/."""
        parts = self.req.path.split("/")
        if len(parts) < 4 or parts[:3] != ["", "v1", "exports"]:
            return None
        rest = parts[4:]
        if rest and rest[-1] == "":
            rest = rest[:-1]
        if len(rest) > 1:
            return parts[3], None
        return parts[3], rest[0] if rest else ""

    def _export_root(self):
        """The ticket of a path that names an export itself (/v1/exports/<ticket>), else None."""
        export = self._export_path()
        return export[0] if export is not None and export[1] == "" else None

    def revoke(self):
        """DELETE /v1/exports/<ticket>: the ticket's holder ends it (no new connection or request
        is accepted with it; the agent closes its open connections). Holding the ticket already
        grants reading the disk, so it is enough to give it up: a backup client revokes its
        tickets here in one request instead of a plugin call through XAPI. Idempotent: a ticket
        that is already revoked or expired answers the same."""
        in_path = self._export_root()
        if in_path is None:
            raise hp.RequestError(
                "method DELETE not allowed",
                status=405,
                code="method_not_allowed",
                headers=[("Allow", "GET, HEAD")],
            )
        ticket_id = self.ticket_id(in_path)
        try:
            self.server.gate.lookup(ticket_id)
        except hp.RequestError as exc:
            if exc.code not in ("ticket_revoked", "ticket_expired"):
                raise
            return self.resp.send_json({"revoked": True, "already": exc.code})
        revoke = getattr(self.server.tickets, "revoke", None)
        if revoke is None:
            raise hp.RequestError(
                "this server cannot revoke tickets", status=405, code="method_not_allowed"
            )
        try:
            revoke(ticket_id)
        except Exception as exc:
            raise map_ticket_error(exc) from None
        return self.resp.send_json({"revoked": True})

    # -- auth --

    def ticket_id(self, in_path):
        auth = self.req.header("authorization")
        bearer = None
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise hp.RequestError(
                    "Authorization must be 'Bearer <ticket>'",
                    status=401,
                    code="unauthorized",
                    headers=[("WWW-Authenticate", 'Bearer realm="fastpath"')],
                )
            bearer = token.strip()
        if in_path in ("", "-"):
            if bearer is None:
                raise hp.RequestError(
                    "a ticket is required (in the path or as Authorization: Bearer)",
                    status=401,
                    code="unauthorized",
                    headers=[("WWW-Authenticate", 'Bearer realm="fastpath"')],
                )
            return bearer
        if bearer is not None and bearer != in_path:
            raise hp.RequestError(
                "the ticket in the path and in Authorization differ",
                status=400,
                code="ticket_mismatch",
            )
        return in_path

    def with_export(self, in_path, action):
        ticket_id = self.ticket_id(in_path)
        gate = self.server.gate
        ticket = gate.lookup(ticket_id)
        self.conn.authenticated()  # out of the small pre-ticket budget (agent.slots)
        want_vdi = self.req.param("vdi")
        if want_vdi is not None and want_vdi.lower() != str(ticket_attr(ticket, "vdi", "")).lower():
            raise hp.RequestError("this ticket is for another VDI", status=403, code="wrong_vdi")
        store = self.server.tickets
        acquire = getattr(store, "acquire", None)
        release = getattr(store, "release", None)
        if acquire is not None:
            try:
                acquire(ticket_id)
            except Exception as exc:
                raise map_ticket_error(exc) from None
        try:
            self.open_and_run(ticket, action)
        finally:
            if acquire is not None and release is not None:
                release(ticket_id)

    def open_and_run(self, ticket, action):
        # A keep-alive connection keeps its last export open for the next request on the same
        # ticket (clients doing many Range reads would otherwise reopen the chain every time).
        export, view = self.conn.cached_export(ticket)
        if export is None:
            try:
                export = self.server.exports_opener(ticket)
            except hp.HttpError:
                raise
            except Exception as exc:
                log.warning(
                    "http: opening the export of ticket %s failed: %s",
                    log_id(ticket_attr(ticket, "id", "?")),
                    exc,
                )
                raise _export_error(exc) from exc
            view = export_view(export, ticket)
            if view.vdi is None:
                view.vdi = ticket_attr(ticket, "vdi", None)
            self.server.metrics.gauge("open_exports", 1)
        self.ticket = ticket
        self.view = view
        ok = False
        try:
            action(self)
            ok = True
        except (hp.HttpError, ClientGone, OSError):
            raise
        except Exception as exc:
            if not type(exc).__module__.startswith("agent."):
                raise
            # The export's own refusals (agent.export.ChainChanged, ExportError, ...): a clean
            # JSON error before the head, a closed stream after it.
            raise _export_error(exc) from exc
        finally:
            self.conn.keep_export(ticket, export, view, reuse=ok and self.resp.keep_alive)

    def record(self, method, nbytes):
        record = getattr(self.view, "record", None)
        if record is not None:
            record(method, nbytes)

    def check_live(self):
        if not self.server.gate.still_valid(self.ticket):
            raise hp.HttpError("ticket expired or was revoked", status=410, code="ticket_expired")
        if self.server._stopping.is_set():
            raise hp.HttpError("agent is stopping", status=503, code="stopping")
        self.view.check()


def _export_error(exc):
    """Map a failure to open an export to an HTTP error, by the exception's type name."""
    name = type(exc).__name__
    low = name.lower()
    msg = str(exc) or name
    if "notfound" in low or isinstance(exc, FileNotFoundError):
        return hp.HttpError(
            "the ticket's VDI was not found: %s" % msg, status=404, code="vdi_not_found"
        )
    if "unsupported" in low or "format" in low:
        return hp.HttpError(msg, status=409, code="unsupported_format")
    if "changed" in low:
        return hp.HttpError(msg, status=409, code="chain_changed")
    if "busy" in low or "locked" in low:
        return hp.HttpError(
            "the SR is busy, retry: %s" % msg,
            status=503,
            code="sr_busy",
            headers=[("Retry-After", "5")],
        )
    if "corrupt" in low or "vhd" in low:
        return hp.HttpError(
            "the VDI's VHD chain cannot be read: %s" % msg, status=500, code="corrupt_vhd"
        )
    return hp.HttpError("cannot open the export: %s" % name, status=500, code="export_failed")
