"""The report layer on hand-made samples: medians, ratios, tamper detection, table, chart; and the
command's usage errors (exit 2, before anything starts)."""

import os
import subprocess
import sys

import pytest

from orchestrator.benchcmd import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sample(seconds, cpu=0.5, server=0.25, rss=10 << 20):
    return {
        "seconds": seconds,
        "client_cpu": cpu,
        "server_cpu": server,
        "client_rss": rss,
        "server_rss": 2 * rss,
    }


def rows():
    gb = 10**9
    r = [
        report.make_row("a/xapi", "q", "XAPI", "d", gb, [sample(4), sample(5), sample(6)]),
        report.make_row("a/cat", "q", "cat", "d", gb, [sample(0.5)] * 3),
        report.make_row("a/fast", "q", "fast", "d", gb, [sample(1), sample(3), sample(2)]),
    ]
    for row in r:
        row["baseline_xapi"], row["baseline_limit"] = "a/xapi", "a/cat"
    report.set_ratios(r)
    return r


def test_median_min_max_and_ratios():
    xapi, cat, fast = rows()
    assert fast["seconds"] == {"median": 2, "min": 1, "max": 3}
    assert fast["gbps"] == {"median": 0.5, "min": 1 / 3, "max": 1.0}
    assert fast["vs_xapi"] == pytest.approx(0.5 / 0.2)
    assert fast["vs_limit"] == pytest.approx(0.5 / 2.0)
    assert xapi["vs_xapi"] == cat["vs_limit"] == 1.0
    assert fast["cpu_client_s_per_gb"] == 0.5
    assert fast["peak_rss_server_mib"] == 20


def test_missing_baseline_gives_no_ratio():
    (row,) = [report.make_row("x", "q", "x", "d", 1, [sample(1)], baseline_xapi="nope")]
    report.set_ratios([row])
    assert row["vs_xapi"] is None and row["baseline_xapi"] is None


def test_consistency_check_catches_tampering():
    result = {"questions": {"q": {"rows": rows()}}}
    assert report.check_consistency(result) == []
    result["questions"]["q"]["rows"][2]["vs_xapi"] *= 1.01
    assert any("vs_xapi" in p for p in report.check_consistency(result))
    result = {"questions": {"q": {"rows": rows()}}}
    result["questions"]["q"]["rows"][2]["gbps"]["median"] = 5.0
    problems = report.check_consistency(result)
    assert any("outside" in p for p in problems)
    result = {"questions": {"q": {"rows": rows()}}}
    result["questions"]["q"]["rows"][2]["baseline_limit"] = "gone"
    assert any("not a row" in p for p in report.check_consistency(result))


def test_table_and_chart(tmp_path):
    r = rows()
    table = report.markdown_table(r)
    lines = table.splitlines()
    assert len(lines) == 2 + len(r)
    assert "| d | fast | 0.500 (0.333–1.000) | 2.50× | 0.25× |" in table
    png = report.chart({"q": {"title": "t", "rows": r}}, str(tmp_path / "c.png"), "title")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--xapi", "http://127.0.0.1:1"],  # without --vm
        ["--transports", "nbd,carrier-pigeon"],
        ["--variants", "tape"],
        ["--runs", "0"],
        ["--steps", "inc1"],  # the first backup into a fresh repository is full
        ["--steps", "full,inc5"],
        ["--fleet", "--vms", "0"],
        ["--fleet", "--days", "-1"],
        ["--fleet", "--repo", "s3://bucket/prefix"],
    ],
)
def test_usage_errors_exit_2(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", *args, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1  # one line
    assert not os.listdir(tmp_path)


def test_missing_moto_is_named_before_anything_starts(monkeypatch, tmp_path):
    """Without moto (only the `bench` extra brings it) the S3 rows cannot run: the command says
    which package is missing and how to skip those rows, before building any disk."""
    import importlib.util

    from orchestrator.benchcmd import run
    from orchestrator.benchcmd.harness import Bench, Options

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "moto" else real(name, *a)
    )
    built = []
    monkeypatch.setattr(Bench, "start_hostsim", lambda *a: built.append(a))
    with pytest.raises(RuntimeError, match=r"xcp-fastpath\[bench\].*--no-s3"):
        run.run_bench(Options(out=str(tmp_path / "out")))
    assert not built and not (tmp_path / "out").exists()
