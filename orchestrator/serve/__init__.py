"""``fastpath serve``: a read-only NBD export of a restore point, straight from the repository.

- ``cache.py``: :class:`ChunkCache`, the bounded cache of decoded (verified, decrypted,
  decompressed) chunks with single-flight fetches and read-ahead for sequential readers;
- ``export.py``: :class:`PointExport` (one disk index seen through the cache, with the interface
  the agent's NBD connection serves: ``size``, ``extents``, ``changed``, ``plan_read``) and
  :class:`PointExports` (the export names, in the shape of the agent's ticket store).

The NBD protocol, sockets, TLS, multi-conn and structured replies are the agent's own
(``agent.nbd``): imports flow ``orchestrator -> agent`` only. The command is
``orchestrator/jobs/serve.py``.
"""
