"""Event-driven XenAPI client: sessions against the pool master, collections kept current by event.from."""

from orchestrator.xapi.client import Collection, Subscription, XapiClient, parse_task_result
from orchestrator.xapi.transport import XapiConnectionError, XapiError, XapiTlsError

__all__ = [
    "Collection",
    "Subscription",
    "XapiClient",
    "XapiConnectionError",
    "XapiError",
    "XapiTlsError",
    "parse_task_result",
]
