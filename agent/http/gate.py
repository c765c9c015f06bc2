"""The ticket gate, the HTTP side of agent.tickets: which ticket a request holds, is it still good.

TicketGate.lookup() checks a ticket id's shape and asks the store, map_ticket_error() turns the
store's refusals (unknown, expired, revoked, too many connections) into HTTP errors, and
ticket_attr() reads a ticket's fields whether it is an object or a dict. routing.Handler takes the
ticket from the path or the Authorization header and calls the gate before any export is opened;
views.py and exportview.py read the ticket's fields with ticket_attr(). server.HttpServer holds the
one gate (server.gate) over the store it was given.
"""

import logging
import re

from agent.http import protocol as hp

log = logging.getLogger("fastpath.http")

TICKET_RE = re.compile(r"^[A-Za-z0-9_\-]{8,128}$")


class TicketGate(object):
    """Resolves a ticket id to a ticket object, mapping the store's answers to HTTP errors.

    The store is agent.tickets.TicketStore or anything like it: `get(ticket_id)` returns the ticket or
    raises (TicketError "unknown ticket" / "ticket expired" / "ticket revoked", or KeyError); a ticket
    has `vdi`, `base`, `expires` and `expired` / `revoked` (attributes or methods). When the store has
    `acquire(id)` / `release(id)` they bound the requests running on one ticket (max_connections).
    """

    def __init__(self, store):
        self.store = store

    def lookup(self, ticket_id):
        if not TICKET_RE.match(ticket_id or ""):
            raise hp.RequestError("invalid ticket", status=403, code="invalid_ticket")
        getter = getattr(self.store, "lookup", None) or self.store.get
        try:
            ticket = getter(ticket_id)
        except KeyError:
            ticket = None
        except Exception as exc:  # the store's own typed errors: expired, revoked, unknown
            raise map_ticket_error(exc) from None
        if ticket is None:
            raise hp.RequestError("invalid ticket", status=403, code="invalid_ticket")
        if _flag(ticket, "revoked"):
            raise hp.RequestError("ticket was revoked", status=410, code="ticket_revoked")
        if _flag(ticket, "expired"):
            raise hp.RequestError("ticket has expired", status=410, code="ticket_expired")
        return ticket

    def still_valid(self, ticket):
        return not (_flag(ticket, "revoked") or _flag(ticket, "expired"))


def _flag(obj, name):
    value = getattr(obj, name, False)
    if callable(value):
        value = value()
    return bool(value)


def map_ticket_error(exc):
    """The store's refusal (agent.tickets.TicketError or similar) as an HTTP error."""
    text = ("%s %s" % (type(exc).__name__, exc)).lower()
    if "expired" in text:
        return hp.RequestError("ticket has expired", status=410, code="ticket_expired")
    if "revoked" in text:
        return hp.RequestError("ticket was revoked", status=410, code="ticket_revoked")
    if "connections" in text or "busy" in text or "limit" in text:
        return hp.RequestError(
            "ticket has too many connections",
            status=503,
            code="too_many_connections",
            headers=[("Retry-After", "1")],
        )
    if "unknown" in text or "notfound" in text or "invalid" in text or isinstance(exc, KeyError):
        return hp.RequestError("invalid ticket", status=403, code="invalid_ticket")
    log.error("http: ticket check failed: %s", exc)
    return hp.RequestError("ticket check failed", status=500, code="internal_error")


def ticket_attr(obj, name, default):
    """A ticket's field: an attribute, or a key when the store hands out dicts."""
    value = getattr(obj, name, default)
    if isinstance(obj, dict):
        value = obj.get(name, default)
    return value
