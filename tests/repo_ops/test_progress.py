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
