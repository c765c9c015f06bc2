"""What ``fastpath bench`` leaves behind: the result's tables, its files, and its text.

``finish`` adds the tables (orchestrator/benchcmd/report.py's rows, headline and chart) to the
result and writes ``bench.md``, ``bench.png`` (when matplotlib is installed) and ``bench.json``
into ``--out``; ``render`` is the text of ``bench.md`` (also what the command prints without
``--json``). Both modes (hostsim and a real pool) end here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from orchestrator.benchcmd import report
from orchestrator.benchcmd.harness import Options


def finish(result: dict[str, Any], opts: Options) -> dict[str, Any]:
    qs = result["questions"]
    tables = {
        "host_side": report.markdown_table(qs["host_side"]["rows"]),
        "end_to_end": report.markdown_table(qs["end_to_end"]["rows"], ("repo", "step")),
    }
    result["headline"] = report.headline(qs)
    tables["headline"] = report.headline_table(result["headline"])
    result["tables"] = tables
    md = os.path.join(opts.out, "bench.md")
    png = os.path.join(opts.out, "bench.png")
    js = os.path.join(opts.out, "bench.json")
    result["files"] = {"markdown": md, "chart": png, "json": js}
    if importlib.util.find_spec("matplotlib") is None:
        result["files"]["chart"] = None
        opts.say("no chart: matplotlib is not installed (pip install 'xcp-fastpath[bench]')")
    else:
        report.chart(qs, png, f"fastpath bench ({result['target']}, runs={opts.runs})")
    with open(md, "w") as f:
        f.write(render(result) + "\n")
    with open(js, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    written = ", ".join(os.path.basename(p) for p in (md, js, result["files"]["chart"]) if p)
    opts.say(f"wrote {written} into {os.path.abspath(opts.out)}/")
    return result


def render(result: dict[str, Any]) -> str:
    qs = result["questions"]
    p = result["params"]
    lines = [
        f"Data: {result['data']}",
        f"Runs: {p['runs']} (median, min–max), connections: {p['connections']}, "
        f"{p['cpu_count']} CPUs, load average at the end {p['load_average'][0]:.1f}. "
        "GB/s = the disk's allocated bytes / seconds (incrementals: effective rate).",
        "",
        "## Headline: the speed goals, measured in this run",
        "",
        result["tables"]["headline"],
        "",
        f"## {qs['host_side']['title']}",
        "",
        "Ratios: vs XAPI's way = / export_raw_vdi of the same disk; vs limit = / "
        + (qs["host_side"]["limit"] or "(no local limit against a real pool)")
        + ".",
        "",
        result["tables"]["host_side"],
        "",
        f"## {qs['end_to_end']['title']}",
        "",
        "Ratios: vs XAPI's way = / backup --transport xapi-export of the same disk and step "
        "(local repository); vs limit = / the physical limit of the same disk "
        "(copy + fdatasync, or plain S3 objects for S3 repositories).",
        "",
        result["tables"]["end_to_end"],
        "",
        f"Chart: {result['files']['chart']}",
        f"Files: {os.path.dirname(os.path.abspath(result['files']['json']))}/ (bench.md, bench.json"
        + (", bench.png)" if result["files"]["chart"] else ")"),
    ]
    return "\n".join(lines)
