"""The agent's HTTP API (see docs/http.md): protocol.py is the sans-IO part, server.py the sockets."""
