"""`fastpath bench --quick` end to end: the tables, the PNG and the JSON agree with each other.

No timing threshold anywhere: only that every number shown is the number stored, that ratios are
value / baseline recomputed here from the JSON, that medians lie within min–max and equal the
median of the stored samples, and that what was measured is what the rows say (incrementals read
less than the full, the expected rows exist for both questions).
"""

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse_tables(markdown):
    """{section title: [row dicts keyed by header]} from bench.md."""
    tables, title, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title, header = line[3:].strip(), None
            tables[title] = []
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-"):
                tables[title].append(dict(zip(header, cells, strict=True)))
    return tables


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    repos = tmp_path_factory.mktemp("bench-repos")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "--quick", "--out", str(out)]
        # the tables' consistency, not the numbers: small disks keep the suite fast
        + ["--size", "16M", "--repo", str(repos), "--json", "--progress", "quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    with open(out / "bench.json") as f:
        stored = json.load(f)
    # every repository and physical-limit copy it made in --repo is gone again
    assert os.listdir(repos) == []
    return out, printed, stored


@pytest.mark.slow
def test_outputs_exist_and_json_matches_file(quick):
    out, printed, stored = quick
    assert printed["ok"] is True
    assert printed["questions"] == stored["questions"]
    png = (out / "bench.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(str(out / "bench.png"))
    assert img.shape[0] > 200 and img.shape[1] > 200
    md = (out / "bench.md").read_text()
    assert stored["tables"]["host_side"] in md
    assert stored["tables"]["end_to_end"] in md
    # the bench says what data it used
    for word in ("text", "zero", "random", "binary"):
        assert word in stored["data"]


@pytest.mark.slow
def test_every_table_row_is_in_the_json_and_back(quick):
    out, _, stored = quick
    tables = parse_tables((out / "bench.md").read_text())
    qs = stored["questions"]
    for key in ("host_side", "end_to_end"):
        table = tables[qs[key]["title"]]
        rows = qs[key]["rows"]
        assert len(table) == len(rows) > 0
        for shown, row in zip(table, rows, strict=True):
            assert shown["disk"] == row["disk"]
            assert shown["what"] == row["label"]
            if key == "end_to_end":
                assert shown["repo"] == (row["repo"] or "–")
                assert shown["step"] == (row["step"] or "–")
            g = row["gbps"]
            assert shown["GB/s median (min–max)"] == (
                f"{g['median']:.3f} ({g['min']:.3f}–{g['max']:.3f})"
            )
            for col, field in (("vs XAPI's way", "vs_xapi"), ("vs limit", "vs_limit")):
                want = "–" if row[field] is None else f"{row[field]:.2f}×"
                assert shown[col] == want, (row["id"], col)
            assert shown["CPU s/GB client"] == f"{row['cpu_client_s_per_gb']:.2f}"
            srv = row["cpu_server_s_per_gb"]
            assert shown["CPU s/GB server"] == ("–" if srv is None else f"{srv:.2f}")


@pytest.mark.slow
def test_ratios_medians_and_samples_are_consistent(quick):
    _, _, stored = quick
    runs = stored["params"]["runs"]
    for q in stored["questions"].values():
        by_id = {r["id"]: r for r in q["rows"]}
        assert len(by_id) == len(q["rows"]), "row ids are unique"
        for r in q["rows"]:
            assert r["runs"] == runs == len(r["samples"])
            gbps = [r["bytes"] / s["seconds"] / 1e9 for s in r["samples"]]
            g = r["gbps"]
            assert g["min"] <= g["median"] <= g["max"]
            assert g["median"] == pytest.approx(statistics.median(gbps))
            assert (g["min"], g["max"]) == pytest.approx((min(gbps), max(gbps)))
            for base_key, ratio_key in (
                ("baseline_xapi", "vs_xapi"),
                ("baseline_limit", "vs_limit"),
            ):
                if r[base_key] is None:
                    assert r[ratio_key] is None
                    continue
                base = by_id[r[base_key]]
                assert r[ratio_key] == pytest.approx(g["median"] / base["gbps"]["median"])
            cpu = statistics.median(s["client_cpu"] for s in r["samples"])
            assert r["cpu_client_s_per_gb"] == pytest.approx(cpu / (r["bytes"] / 1e9))
            assert r["peak_rss_client_mib"] > 0


@pytest.mark.slow
def test_both_questions_have_the_expected_rows(quick):
    _, _, stored = quick
    host = {r["id"]: r for r in stored["questions"]["host_side"]["rows"]}
    for disk in ("flat", "chain3"):
        for kind in (
            "agent-nbd-nbdcopy",
            "agent-nbd",
            "agent-http-blocks",
            "agent-http-vhd",
            "xapi-export",
            "xapi-nbd",
            "cat",
        ):
            assert f"host/{disk}/{kind}" in host
        assert host[f"host/{disk}/xapi-export"]["vs_xapi"] == pytest.approx(1.0)
        assert host[f"host/{disk}/cat"]["vs_limit"] == pytest.approx(1.0)
        assert host[f"host/{disk}/cat"]["cpu_server_s_per_gb"] is None  # no server
        assert host[f"host/{disk}/agent-nbd-nbdcopy"]["cpu_server_s_per_gb"] is not None
    assert "host/flat/qemu-nbd" in host  # qemu reads the flat VHD only
    assert "host/chain3/qemu-nbd" not in host
    assert stored["disks"]["chain3"]["depth"] == 3 and stored["disks"]["flat"]["depth"] == 1

    e2e = {r["id"]: r for r in stored["questions"]["end_to_end"]["rows"]}
    for rid in ("e2e/chain3/limit/local", "e2e/chain3/limit/s3"):
        assert rid in e2e
    for transport in ("nbd", "xapi-export"):
        for step in ("full", "inc1"):
            assert f"e2e/chain3/{transport}/local/{step}" in e2e
    for variant in ("encrypted", "s3"):
        assert e2e[f"e2e/chain3/nbd/{variant}/full"]["baseline_limit"] == (
            "e2e/chain3/limit/s3" if variant == "s3" else "e2e/chain3/limit/local"
        )
    # an incremental after ~1 % of guest writes reads less than the full backup of that disk
    for transport in ("nbd", "xapi-export"):
        full = e2e[f"e2e/chain3/{transport}/local/full"]["samples"]
        inc = e2e[f"e2e/chain3/{transport}/local/inc1"]["samples"]
        for f, i in zip(full, inc, strict=True):
            assert 0 < i["bytes_read"] < f["bytes_read"]
            assert i["guest_bytes_written"] > 0


@pytest.mark.slow
def test_headline_goals_are_recomputed_from_the_rows(quick):
    out, _, stored = quick
    rows = {r["id"]: r for q in stored["questions"].values() for r in q["rows"]}
    items = stored["headline"]
    assert {h["what"] for h in items} >= {
        "agent NBD vs XAPI's way",
        "agent NBD vs qemu-nbd",
        "1 % incremental time / full time (nbd), data phase",
    }
    for h in items:
        a, b = rows[h["numerator"]], rows[h["denominator"]]
        m = h["metric"]
        assert m == ("gbps" if h["numerator"].startswith("host/") else "data_gbps")
        assert h["value"] == pytest.approx(a[m]["median"] / b[m]["median"])
        assert h["met"] == (
            h["value"] >= h["goal"] if h["kind"] == "min" else h["value"] <= h["goal"]
        )
    assert stored["tables"]["headline"] in (out / "bench.md").read_text()
    from orchestrator.benchcmd import report

    assert report.check_consistency(stored) == []
