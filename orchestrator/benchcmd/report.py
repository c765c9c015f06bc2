"""Turning samples into rows, ratios, Markdown tables and a PNG chart (no I/O except the PNG).

A row is one thing measured several times (one transport on one disk, one backup step...). Its
``bytes`` is the disk's allocated bytes, the same for every row of that disk, so GB/s ratios are
time ratios; an incremental's GB/s is therefore an *effective* rate (disk bytes made restorable
per second), which is what makes it comparable with copying the disk.

Each row names its baselines by row id (``baseline_xapi``, ``baseline_limit``), and its ratios are
``gbps.median / baseline.gbps.median``: :func:`check_consistency` recomputes them from the JSON.
"""

from __future__ import annotations

import statistics
from typing import Any

GB = 1e9
MiB = 1 << 20


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def make_row(
    rid: str,
    question: str,
    label: str,
    disk: str,
    nbytes: int,
    samples: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """``samples``: [{"seconds", "client_cpu", "server_cpu" (or None), "client_rss",
    "server_rss" (or None)}] — CPU in seconds, RSS in bytes."""
    secs = [max(s["seconds"], 1e-9) for s in samples]
    gbps = [nbytes / s / GB for s in secs]
    gb = max(nbytes, 1) / GB
    server_cpu = [s["server_cpu"] for s in samples if s.get("server_cpu") is not None]
    server_rss = [s["server_rss"] for s in samples if s.get("server_rss") is not None]
    row = {
        "id": rid,
        "question": question,
        "label": label,
        "disk": disk,
        "bytes": nbytes,
        "runs": len(samples),
        "samples": samples,
        "seconds": spread(secs),
        "gbps": spread(gbps),
        "cpu_client_s_per_gb": statistics.median(s["client_cpu"] for s in samples) / gb,
        "cpu_server_s_per_gb": statistics.median(server_cpu) / gb if server_cpu else None,
        "peak_rss_client_mib": max(s["client_rss"] for s in samples) / MiB,
        "peak_rss_server_mib": max(server_rss) / MiB if server_rss else None,
        "baseline_xapi": None,
        "baseline_limit": None,
        "vs_xapi": None,
        "vs_limit": None,
    }
    data = [s.get("data_seconds") for s in samples]
    if data and all(d is not None for d in data):
        # End to end: the data phase alone (process start, XAPI login, snapshot and commit
        # left out), so a small disk still measures the data path, not the fixed cost.
        row["data_seconds"] = spread([max(d, 1e-9) for d in data])
        row["data_gbps"] = spread([nbytes / max(d, 1e-9) / GB for d in data])
    row.update(extra)
    return row


def set_ratios(rows: list[dict[str, Any]]) -> None:
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        for key, ratio in (("baseline_xapi", "vs_xapi"), ("baseline_limit", "vs_limit")):
            base = by_id.get(r[key]) if r[key] else None
            if base is None:
                r[key] = None
                r[ratio] = None
            else:
                r[ratio] = r["gbps"]["median"] / base["gbps"]["median"]


def _f(value: float | None, fmt: str = "{:.2f}", suffix: str = "") -> str:
    return "–" if value is None else fmt.format(value) + suffix


def markdown_table(rows: list[dict[str, Any]], extra_cols: tuple[str, ...] = ()) -> str:
    head = ["disk", *extra_cols, "what", "GB/s median (min–max)", "vs XAPI's way", "vs limit"]
    head += ["data phase s"]
    head += ["CPU s/GB client", "CPU s/GB server", "peak RSS client MiB", "peak RSS server MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        g = r["gbps"]
        cells = [r["disk"], *(str(r.get(c) or "–") for c in extra_cols), r["label"]]
        cells += [
            f"{g['median']:.3f} ({g['min']:.3f}–{g['max']:.3f})",
            _f(r["vs_xapi"], suffix="×"),
            _f(r["vs_limit"], suffix="×"),
            _f((r.get("data_seconds") or {}).get("median"), "{:.3f}"),
            _f(r["cpu_client_s_per_gb"]),
            _f(r["cpu_server_s_per_gb"]),
            _f(r["peak_rss_client_mib"], "{:.0f}"),
            _f(r["peak_rss_server_mib"], "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(questions: dict[str, dict[str, Any]], path: str, title: str) -> str:
    """One horizontal bar chart per question: GB/s median with min–max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [q for q in questions if questions[q]["rows"]]
    heights = [max(2.0, 0.28 * len(questions[q]["rows"]) + 1.2) for q in names]
    fig, axes = plt.subplots(
        len(names), 1, figsize=(10, sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    if len(names) == 1:
        axes = [axes]
    colors = {"fast path": "#2a9d8f", "xapi": "#e76f51", "plain nbd": "#8d99ae", "limit": "#264653"}
    for ax, q in zip(axes, names, strict=True):
        rows = questions[q]["rows"]
        labels = [
            " · ".join(x for x in (r["disk"], r.get("repo"), r.get("step"), r["label"]) if x)
            for r in rows
        ]
        med = [r["gbps"]["median"] for r in rows]
        lo = [r["gbps"]["median"] - r["gbps"]["min"] for r in rows]
        hi = [r["gbps"]["max"] - r["gbps"]["median"] for r in rows]
        ys = list(range(len(rows)))[::-1]
        ax.barh(
            ys,
            med,
            xerr=[lo, hi],
            color=[colors.get(r.get("kind", ""), "#999999") for r in rows],
            capsize=2,
        )
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("GB/s (disk's allocated bytes / s), median of runs, whiskers min–max")
        ax.set_title(questions[q]["title"], fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_consistency(result: dict[str, Any], rel: float = 1e-9) -> list[str]:
    """Problems found when the JSON is read back (empty list: consistent)."""
    problems = []
    for qname, q in result["questions"].items():
        by_id = {r["id"]: r for r in q["rows"]}
        for r in q["rows"]:
            g = r["gbps"]
            if not g["min"] <= g["median"] <= g["max"]:
                problems.append(f"{qname}/{r['id']}: median outside min–max")
            for key, ratio in (("baseline_xapi", "vs_xapi"), ("baseline_limit", "vs_limit")):
                if r[key] is None:
                    if r[ratio] is not None:
                        problems.append(f"{qname}/{r['id']}: {ratio} without a baseline")
                    continue
                base = by_id.get(r[key])
                if base is None:
                    problems.append(f"{qname}/{r['id']}: baseline {r[key]} is not a row")
                    continue
                want = g["median"] / base["gbps"]["median"]
                if abs(r[ratio] - want) > rel * max(1.0, abs(want)):
                    problems.append(f"{qname}/{r['id']}: {ratio} {r[ratio]} != {want}")
    return problems


# The project's speed goals (docs/benchmarks.md "How speed is compared"): (name, numerator row,
# denominator row, goal, "min" = ratio must be >= goal / "max" = <= goal, metric). Rows are ids
# with {disk} filled in. Host-side rows compare whole reads ("gbps"); end-to-end goals compare
# data phases ("data_gbps": the backup's reading and storing vs the physical copy's), since a
# command's fixed cost (process start, XAPI login, snapshot, commit; reported in the table and by
# bench/startup.py) is not what the goal is about.
GOALS = (
    (
        "agent NBD vs XAPI's way",
        "host/{disk}/agent-nbd-nbdcopy",
        "host/{disk}/xapi-export",
        5.0,
        "min",
        "gbps",
    ),
    (
        "agent NBD vs qemu-nbd",
        "host/{disk}/agent-nbd-nbdcopy",
        "host/{disk}/qemu-nbd",
        1.5,
        "min",
        "gbps",
    ),
    (
        "full backup (nbd) vs copy + fdatasync, data phase",
        "e2e/{disk}/nbd/local/full",
        "e2e/{disk}/limit/local",
        0.8,
        "min",
        "data_gbps",
    ),
    (
        "1 % incremental time / full time (nbd), data phase",
        "e2e/{disk}/nbd/local/full",  # same bytes: time ratio = inverse GB/s ratio
        "e2e/{disk}/nbd/local/inc1",
        0.03,
        "max",
        "data_gbps",
    ),
)


def headline(questions: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals, per disk, from the rows' medians (only those whose two rows exist)."""
    rows = {r["id"]: r for q in questions.values() for r in q["rows"]}
    disks = list(dict.fromkeys(r["disk"] for r in rows.values()))
    out = []
    for disk in disks:
        for name, num, den, goal, kind, metric in GOALS:
            a, b = rows.get(num.format(disk=disk)), rows.get(den.format(disk=disk))
            if a is None or b is None or metric not in a or metric not in b:
                continue
            value = a[metric]["median"] / b[metric]["median"]
            out.append(
                {
                    "disk": disk,
                    "what": name,
                    "value": value,
                    "goal": goal,
                    "kind": kind,
                    "metric": metric,
                    "met": value >= goal if kind == "min" else value <= goal,
                    "numerator": a["id"],
                    "denominator": b["id"],
                }
            )
    return out


def headline_table(items: list[dict[str, Any]]) -> str:
    lines = ["| disk | goal | this run | met |", "|---|---|---|---|"]
    for h in items:
        sign = "≥" if h["kind"] == "min" else "≤"
        lines.append(
            f"| {h['disk']} | {h['what']} {sign} {h['goal']:g} | {h['value']:.3g} | "
            f"{'yes' if h['met'] else 'no'} |"
        )
    return "\n".join(lines)
