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
- ``agent-nbd-xapi``: {"xapi": URL, "user", "vdi": UUID, "cafile": optional, "connections": N}
                   (as a backup opens a disk: the fastpath plugin's open_export through XAPI on
                   the host that reads the VDI's SR, then AgentNbdSource.from_plugin)

"seconds" in the answer is the time from opening the source to the last byte (XAPI login and
process start left out, the plugin call and the export's own opening counted), split into
"open_seconds" (up to the source's open(): plugin call, handshake, allocation map) and
"read_seconds" (the data).
"""

from __future__ import annotations

import json
import sys
import time


def drain(spec: dict) -> dict:
    kind = spec["kind"]
    conns = int(spec.get("connections", 4))
    session = None
    started = time.perf_counter()
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
    elif kind in ("xapi-nbd", "xapi-export", "agent-nbd-xapi"):
        import os

        from orchestrator.jobs.xapi_session import XapiTarget, connect

        password = spec.get("password") or os.environ["FASTPATH_XAPI_PASSWORD"]
        target = XapiTarget(spec["xapi"], spec["user"], password, spec.get("cafile"))
        session = connect(target)
        started = time.perf_counter()
        if kind == "agent-nbd-xapi":
            from orchestrator.sources.agent_nbd import AgentNbdSource

            src = AgentNbdSource.from_plugin(
                _open_export(session.xenapi, spec["vdi"]), connections=conns
            )
        elif kind == "xapi-nbd":
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
        opened = time.perf_counter()
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
    end = time.perf_counter()
    return {
        "bytes": total,
        "blocks": blocks,
        "seconds": end - started,
        "open_seconds": opened - started,
        "read_seconds": end - opened,
    }


def _open_export(x, vdi_uuid: str) -> dict:
    """The plugin's open_export answer for ``vdi_uuid``, asked of the host a backup would ask
    (orchestrator/jobs/backup/routing.py: the SR's own host, or the VM's resident host on a
    shared SR)."""
    from orchestrator.jobs.backup.routing import Pbd, Router

    ref = x.VDI.get_by_uuid(vdi_uuid)
    resident = None
    for vbd in x.VDI.get_VBDs(ref):
        on = x.VM.get_resident_on(x.VBD.get_VM(vbd))
        if on != "OpaqueRef:NULL":
            resident = on
            break
    pbds = []
    for pbd in x.SR.get_PBDs(x.VDI.get_SR(ref)):
        rec = x.PBD.get_record(pbd)
        pbds.append(Pbd(rec["host"], bool(rec.get("currently_attached"))))
    master = x.pool.get_master(x.pool.get_all()[0])
    host = Router().route(pbds, resident, master).host
    args = {"vdi": vdi_uuid, "transports": "nbd,http", "ttl": "600"}
    return json.loads(x.host.call_plugin(host, "fastpath", "open_export", args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m orchestrator.benchcmd.drain SPEC_JSON", file=sys.stderr)
        return 2
    print(json.dumps(drain(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
