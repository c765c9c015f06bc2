"""A discarding client, run as its own process so its CPU time and peak RSS are its own.

    python -m orchestrator.benchcmd.drain '{"kind": ..., ...}'

Reads a whole export through the orchestrator's real sources and throws the bytes away; prints
one JSON line: {"bytes": N, "blocks": K}. Kinds:

- ``agent-nbd``:   {"url": "nbd://host:port/<ticket>", "connections": N}  (AgentNbdSource)
- ``agent-http``:  {"url": "http://host:port/v1/exports/<ticket>", "connections": N}
                   (AgentHttpSource: the framed blocks stream, N streams by block range)
- ``xapi-nbd``:    {"xapi": URL, "user", "vdi": UUID, "connections": N, "cafile": optional}
                   (XapiNbdSource: VDI.get_nbd_info, TLS verified with the host certificate)
- ``agent-nbd-plugin``, ``agent-http-plugin``: {"export": <the plugin's open_export answer>}
                   (as the backup job opens them: TLS pinned to the agent's fingerprint)
- ``xapi-export``: {"xapi": URL, "user", "vdi": UUID, "cafile": optional}
                   (the XAPI password comes from $FASTPATH_XAPI_PASSWORD, never from argv)
                   (XapiExportSource: export_raw_vdi?format=vhd, parsed as it streams)
"""

from __future__ import annotations

import json
import sys


def drain(spec: dict) -> dict:
    kind = spec["kind"]
    conns = int(spec.get("connections", 4))
    session = None
    if kind == "agent-nbd":
        from orchestrator.sources.agent_nbd import AgentNbdSource

        src = AgentNbdSource.from_url(spec["url"], connections=conns)
    elif kind == "agent-http":
        from orchestrator.sources.agent_http import AgentHttpSource

        src = AgentHttpSource(spec["url"], streams=conns)
    elif kind == "agent-nbd-plugin":
        from orchestrator.sources.agent_nbd import AgentNbdSource

        src = AgentNbdSource.from_plugin(spec["export"], connections=conns)
    elif kind == "agent-http-plugin":
        from orchestrator.sources.agent_http import AgentHttpSource

        src = AgentHttpSource.from_plugin(spec["export"], streams=conns)
    elif kind in ("xapi-nbd", "xapi-export"):
        import os

        from orchestrator.jobs.xapi_session import XapiTarget, connect

        password = spec.get("password") or os.environ["FASTPATH_XAPI_PASSWORD"]
        target = XapiTarget(spec["xapi"], spec["user"], password, spec.get("cafile"))
        session = connect(target)
        if kind == "xapi-nbd":
            from orchestrator.sources.xapi_nbd import XapiNbdSource

            ref = session.xenapi.VDI.get_by_uuid(spec["vdi"])
            src = XapiNbdSource(session.xenapi, ref, connections=conns)
        else:
            from orchestrator.sources.xapi_export import XapiExportSource

            src = XapiExportSource(
                spec["xapi"], session._session, spec["vdi"], cafile=spec.get("cafile")
            )
    else:
        raise SystemExit(f"drain: unknown kind {kind!r}")
    total = blocks = 0
    try:
        src.open(None)
        for _index, data in src.read_blocks():
            total += len(data)
            blocks += 1
    finally:
        src.close()
        if session is not None:
            try:
                session.xenapi.session.logout()
            except Exception:
                pass
    return {"bytes": total, "blocks": blocks}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m orchestrator.benchcmd.drain SPEC_JSON", file=sys.stderr)
        return 2
    print(json.dumps(drain(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
