"""Every bound the HTTP API puts on a client, in one place (sans-IO: plain numbers, no sockets).

A client facing dom0's network may be slow, hostile or simply too many: each bound here names what
it caps and the module that enforces it, so a new bound (and its test) has an obvious home:

    max_request_line    protocol.RequestParser: a longer request line is 414, then close
    max_header_bytes    protocol.RequestParser: a bigger header block is 431, then close
    max_headers         protocol.RequestParser: more header fields is 431, then close
    header_timeout      connection.Connection: the whole request head (slowloris), 408 and close;
                        server.HttpServer._negotiate: the client's first byte and TLS handshake
    idle_timeout        connection.Connection: a keep-alive connection idle between requests closes
    send_timeout        response.Response: a client that stops reading ends its connection
    max_connections     server.HttpServer: slots taken at accept; when all are used the oldest
                        idle connection is closed (pre-ticket first, then idle keep-alive), and only
                        when every connection is busy is the newcomer refused (503 or a close)
    max_unauthenticated server.HttpServer: connections that have not presented a valid ticket; a
                        newcomer over it displaces the oldest idle one (agent.slots)
    max_unauthenticated_per_address
                        the same, per source address
    unauthenticated_timeout
                        connection.Connection, server._negotiate: how long a connection that has
                        not presented a ticket may stay silent (first byte, TLS, head, keep-alive)
    max_requests_per_connection
                        connection.Connection: the last one is answered "Connection: close"

The daemon fills it from the [http] section of agent.conf (see docs/http.md, "Limits").
"""


class Limits(object):
    """Bounds on what one client may send or hold. All sizes in bytes, times in seconds."""

    def __init__(
        self,
        max_request_line=8192,
        max_header_bytes=16384,
        max_headers=64,
        header_timeout=10.0,
        idle_timeout=60.0,
        send_timeout=60.0,
        max_connections=64,
        max_requests_per_connection=10000,
        max_unauthenticated=32,
        max_unauthenticated_per_address=16,
        unauthenticated_timeout=5.0,
    ):
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.max_requests_per_connection = max_requests_per_connection
        self.max_unauthenticated = max_unauthenticated
        self.max_unauthenticated_per_address = max_unauthenticated_per_address
        self.unauthenticated_timeout = unauthenticated_timeout

    def budget(self):
        """The slot budget of agent.slots for these limits."""
        from agent.slots import Budget

        return Budget(
            self.max_connections, self.max_unauthenticated, self.max_unauthenticated_per_address
        )
