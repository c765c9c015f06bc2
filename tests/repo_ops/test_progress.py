"""Progress display: lines, JSON lines, rich; thread safety; pacing."""

from __future__ import annotations

import io
import json
import threading

import pytest

from orchestrator.progress import Progress


def test_lines_mode_prints_start_pacing_and_end():
    out = io.StringIO()
    ui = Progress("lines", stream=out, interval=3600)
    with ui.task("mark", total=100, unit="indexes") as t:
        for _ in range(100):
            t.advance()
        t.done("100 indexes read")
    ui.log("a note")
    lines = out.getvalue().splitlines()
    assert lines[0] == "mark: started (100 indexes)"
    assert lines[1].startswith("mark: 1/100 indexes")  # the first update, then paced
    assert lines[2].startswith("mark: 100 indexes read (")
    assert lines[3] == "a note"
    assert len(lines) == 4


def test_json_mode_emits_parseable_events():
    out = io.StringIO()
    ui = Progress.create("auto", json_output=True, stream=out, interval=0)
    assert ui.mode == "json"
    with ui.task("sweep", total=3) as t:
        t.advance(3)
    ui.log("hello", unit="x")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["start", "progress", "end", "log"]
    assert events[2]["completed"] == 3 and events[3]["unit"] == "x"


def test_failure_inside_a_task_is_reported():
    out = io.StringIO()
    ui = Progress("lines", stream=out)
    with pytest.raises(RuntimeError):
        with ui.task("gc"):
            raise RuntimeError("backend down")
    assert "gc: failed: backend down" in out.getvalue()


def test_auto_mode_picks_lines_when_not_a_tty_and_rich_works():
    assert Progress("auto", stream=io.StringIO()).mode == "lines"
    out = io.StringIO()
    ui = Progress("rich", stream=out)
    with ui.task("verify", total=10) as t:
        t.advance(10)
        t.done("10 chunks")
    ui.close()
    assert "10 chunks" in out.getvalue()


def test_advance_from_many_threads_counts_everything():
    ui = Progress("quiet")
    task = ui.task("x", total=8000)

    def work():
        for _ in range(1000):
            task.advance()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert task.completed == 8000


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        Progress("fancy")


def test_byte_tasks_show_amount_rate_and_eta_in_lines_mode(monkeypatch):
    import orchestrator.progress as progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    ui = Progress("lines", stream=out, interval=0)
    with ui.task("backup vm1", total=100 << 20, unit="bytes") as t:
        clock[0] += 2.0
        t.advance(50 << 20)  # 50 MiB in 2 s: 25 MiB/s, 50 MiB left: 2 s
        t.done("done")
    line = out.getvalue().splitlines()[1]
    assert line == "backup vm1: 50.0 MiB/100.0 MiB (50%), 25.0 MiB/s, ETA 0:00:02", line


def test_rich_mode_renders_bytes_and_rate_for_byte_tasks():
    out = io.StringIO()
    ui = Progress("rich", stream=out)
    try:
        with ui.task("backup vm1", total=8 << 20, unit="bytes") as t:
            t.advance(4 << 20)
            columns = ui._rich.columns
            task = ui._rich.tasks[0]
            amount, rate = (str(c.render(task)) for c in columns[2:4])
            assert amount == "4.0/8.0 MiB", amount
            assert rate == "?" or rate.endswith("/s"), rate  # "?" until rich has two samples
        with ui.task("mark", total=10, unit="indexes") as t:
            t.advance(3)
            task = ui._rich.tasks[1]
            assert str(columns[2].render(task)).replace(" ", "") == "3/10"
            assert str(columns[3].render(task)) == ""  # no rate for counts
    finally:
        ui.close()
