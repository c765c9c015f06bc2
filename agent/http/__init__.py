"""The agent's HTTP API (docs/http.md): export info, extents, vhd / raw / blocks streams, health,
metrics. The package's modules follow a request from the listening socket to the last byte sent:

    server.py      HttpServer: listen, accept, connection slots (max_connections), TLS, stop
    connection.py  Connection: one client's request heads, header / idle timeouts, keep-alive,
                   the export kept open between its requests
    routing.py     Handler: path -> view, the ticket (path or Bearer), the export opened for it
    gate.py        TicketGate: a ticket id -> a valid ticket, the store's refusals as HTTP errors
    views.py       the resources: health, metrics, info, extents, raw, blocks, vhd
    response.py    Response: the head, JSON, and the streams' bytes (sendfile, pread, zeros, cork)

and beside them, used by those:

    limits.py      Limits: every bound a client meets, and where each is enforced
    protocol.py    sans-IO: request parser, Range, response heads, blocks-stream framing
    exportview.py  ExportView: what the views need from an export (agent.export.Export adapter)
    metrics.py     HttpMetrics counters, prometheus_lines() for the daemon's /metrics extras

Import each name from the module that defines it (agent.http.server.HttpServer,
agent.http.limits.Limits, agent.http.protocol.BlocksDecoder, ...); this file exports nothing, so
importing the wire format (as the orchestrator does) does not load the server.
"""
