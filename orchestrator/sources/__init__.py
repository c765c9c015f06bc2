"""Where a backup's blocks come from.

- ``nbd`` (agent_nbd): the agent's NBD export through libnbd (multi-conn, aio, block status).
- ``http`` (agent_http): the agent's framed blocks stream, several streams in parallel.
- ``xapi-nbd`` (xapi_nbd): XAPI's own NBD plus CBT, for hosts without the agent.
- ``xapi-export`` (xapi_export): XAPI's legacy export_raw_vdi VHD stream.
- ``auto``: the agent first (nbd, then http), then xapi-nbd, then xapi-export; the job says which
  one it used and why (orchestrator.jobs.backup).
"""

TRANSPORTS = ("nbd", "http", "xapi-nbd", "xapi-export")
AUTO_ORDER = TRANSPORTS
AGENT_TRANSPORTS = ("nbd", "http")
