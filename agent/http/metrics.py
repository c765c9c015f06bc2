"""The HTTP API's counters and their Prometheus text: HttpMetrics and prometheus_lines().

One HttpMetrics per server.HttpServer (server.metrics): the server counts connections, response.py
counts bytes by transport and statuses, views.py counts blocks by send path, connection.py and
server.py count errors by kind. views.metrics() renders it for GET /metrics, with the daemon's
extra text (the NBD server's counters) from prometheus_lines(). The metric names are listed in
docs/http.md (GET /metrics).
"""

import logging
import re
import threading

log = logging.getLogger("fastpath.http")


class HttpMetrics(object):
    """Counters for /metrics (Prometheus text format). Thread-safe; cheap increments."""

    TRANSPORTS = ("vhd", "raw", "blocks", "json", "metrics")

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes_sent = dict.fromkeys(self.TRANSPORTS, 0)
        self.requests = {}  # status -> count
        self.errors = {}  # kind -> count
        self.blocks = {"sendfile": 0, "pread": 0, "assembled": 0, "zero": 0}
        self.connections_open = 0
        self.connections_total = 0
        self.connections_rejected = 0
        self.open_exports = 0

    def add(self, table, key, n=1):
        with self._lock:
            d = getattr(self, table)
            d[key] = d.get(key, 0) + n

    def gauge(self, name, delta):
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def render(self, extra=None):
        with self._lock:
            lines = []

            def metric(name, kind, help_text, samples):
                lines.append("# HELP %s %s" % (name, help_text))
                lines.append("# TYPE %s %s" % (name, kind))
                for labels, value in samples:
                    if labels:
                        lab = ",".join('%s="%s"' % kv for kv in labels)
                        lines.append("%s{%s} %d" % (name, lab, value))
                    else:
                        lines.append("%s %d" % (name, value))

            metric(
                "fastpath_http_bytes_sent_total",
                "counter",
                "Response body bytes sent, by transport.",
                [((("transport", t),), v) for t, v in sorted(self.bytes_sent.items())],
            )
            metric(
                "fastpath_http_requests_total",
                "counter",
                "HTTP requests answered, by status code.",
                [((("status", str(s)),), v) for s, v in sorted(self.requests.items())],
            )
            metric(
                "fastpath_http_errors_total",
                "counter",
                "Errors, by kind (client protocol errors, disconnects, internal errors).",
                [((("kind", k),), v) for k, v in sorted(self.errors.items())],
            )
            metric(
                "fastpath_http_blocks_total",
                "counter",
                "Blocks sent in streams, by path: sendfile (zero-copy), pread (whole block, TLS), assembled in memory, zero.",
                [((("path", k),), v) for k, v in sorted(self.blocks.items())],
            )
            metric(
                "fastpath_http_open_exports",
                "gauge",
                "Exports held open by HTTP requests right now.",
                [((), self.open_exports)],
            )
            metric(
                "fastpath_http_connections_open",
                "gauge",
                "Client connections open right now.",
                [((), self.connections_open)],
            )
            metric(
                "fastpath_http_connections_total",
                "counter",
                "Client connections accepted.",
                [((), self.connections_total)],
            )
            metric(
                "fastpath_http_connections_rejected_total",
                "counter",
                "Client connections refused because max_connections was reached.",
                [((), self.connections_rejected)],
            )
        text = "\n".join(lines) + "\n"
        if extra is not None:
            try:
                more = extra()
            except Exception:  # a broken hook must not break /metrics
                log.exception("metrics hook failed")
                more = ""
            if more:
                text += more if more.endswith("\n") else more + "\n"
        return text


_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_lines(prefix, values, kind="gauge"):
    """Prometheus text for a flat dict of numbers (e.g. NBDServer.stats(), Counters.snapshot()),
    one untyped-help metric per key: <prefix>_<key>. Non-numeric values are skipped. For
    HttpServer(metrics_extra=lambda: prometheus_lines("fastpath_nbd", nbd.stats()) + ...)."""
    lines = []
    for key in sorted(values):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "%s_%s" % (prefix, _METRIC_NAME.sub("_", str(key)))
        lines.append("# TYPE %s %s" % (name, kind))
        lines.append("%s %s" % (name, repr(value) if isinstance(value, float) else value))
    return "\n".join(lines) + ("\n" if lines else "")
