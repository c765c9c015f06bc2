"""Job files without a pool: parsing and its one-line errors, the systemd units (checked by
``systemd-analyze verify`` where it exists), the textfile (parsed by prometheus_client) and
the webhook (a local HTTP server)."""

import http.server
import json
import shutil
import subprocess
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.cliutil import UsageError
from orchestrator.jobs.job import sinks
from orchestrator.jobs.job.config import load_job
from tests.e2e.conftest import fastpath

GOOD = """\
name = "nightly"
repository = "repo"
xapi = "http://127.0.0.1:1"
password-file = "pw"
tags = ["backup"]
max-vms = 3

[retention]
keep-last = 2
keep-daily = 7

[report]
textfile = "fastpath.prom"
"""


def test_keep_yearly_is_a_retention_key(tmp_path):
    job = load_job(str(write(tmp_path, GOOD.replace("keep-daily = 7", "keep-yearly = 5"))))
    assert job.policy().keep_yearly == 5 and job.policy().keep_last == 2


def write(tmp_path, text, name="job.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_file(tmp_path):
    job = load_job(str(write(tmp_path, GOOD)))
    assert job.name == "nightly"
    assert job.repository == str(tmp_path / "repo")
    assert job.password_file == str(tmp_path / "pw")
    assert (job.max_vms, job.max_per_host) == (3, 1)
    assert job.policy().keep_last == 2 and job.policy().keep_daily == 7
    assert job.textfile == str(tmp_path / "fastpath.prom")


@pytest.mark.parametrize(
    "extra, message",
    [
        ("colour = 1\n", "job.toml:7: unknown key 'colour'"),
        ("max-vms = 0\n", "max-vms must be >= 1"),
        ('transport = "ftp"\n', "unknown transport 'ftp'"),
        ('pools = "some"\n', 'pools must be "all"'),
        ("cbt = 1\n", "cbt must be a bool"),
    ],
)
def test_bad_top_level(tmp_path, extra, message):
    # the line replaces ``max-vms = 3`` (line 6 of GOOD) or comes right after it (line 7)
    new = extra if extra.startswith("max-vms") else "max-vms = 3\n" + extra
    text = GOOD.replace("max-vms = 3\n", new)
    with pytest.raises(UsageError) as e:
        load_job(str(write(tmp_path, text)))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_section_names_line(tmp_path):
    p = write(tmp_path, GOOD.replace("keep-daily = 7", "keep-dialy = 7"))
    with pytest.raises(UsageError, match=r"job.toml:10: unknown key 'retention.keep-dialy'"):
        load_job(str(p))


def test_not_toml_and_no_selection(tmp_path):
    with pytest.raises(UsageError, match="not a valid TOML"):
        load_job(str(write(tmp_path, "name = \n")))
    with pytest.raises(UsageError, match="selects no VMs"):
        load_job(str(write(tmp_path, 'name = "a"\nrepository = "r"\n')))
    r = fastpath("job", "check", tmp_path / "missing.toml", expect=2)
    assert "cannot read job file" in r["_stderr"]


def test_timer_units(tmp_path):
    job = write(tmp_path, GOOD)
    out = tmp_path / "units"
    r = fastpath("job", "timer", job, "--on-calendar", "Mon..Fri 02:00", "--dir", out)
    service, timer = (out / "fastpath-job-nightly.service"), (out / "fastpath-job-nightly.timer")
    assert r["files"] == [str(service), str(timer)]
    t = timer.read_text()
    assert "OnCalendar=Mon..Fri 02:00\n" in t and "Persistent=true\n" in t
    assert "Unit=fastpath-job-nightly.service" in t and "WantedBy=timers.target" in t
    s = service.read_text()
    assert "Type=oneshot" in s and f"job run {job}" in s


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_timer_units_verify(tmp_path):
    job = write(tmp_path, GOOD)
    fastpath("job", "timer", job, "--on-calendar", "daily", "--dir", tmp_path)
    p = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "fastpath-job-nightly.timer"),
            str(tmp_path / "fastpath-job-nightly.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify also complains about the host's own units on some machines: judge ours only
    ours = [ln for ln in (p.stdout + p.stderr).splitlines() if "fastpath-job-nightly" in ln]
    assert not ours, ours
    bad = subprocess.run(["systemd-analyze", "calendar", "daily"], capture_output=True, timeout=30)
    assert bad.returncode == 0


def report(ok=True):
    row = {
        "vm": "u-1",
        "name": 'we"ird',
        "result": "ok" if ok else "failed",
        "bytes_read": 10,
        "bytes_stored": 4,
        "seconds": 1.5,
    }
    return {"job": "nightly", "ok": ok, "started": 100.0, "ended": 160.5, "vms": [row]}


def test_textfile_parses():
    text = sinks.textfile(report(), {"u-1": 90.0}, now=200.0)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    start = fams["fastpath_job_last_run_start_timestamp_seconds"].samples[0]
    assert start.value == 100.0 and start.labels == {"job": "nightly"}
    age = fams["fastpath_vm_newest_restore_point_age_seconds"].samples[0]
    assert age.value == 110.0 and age.labels["name"] == 'we"ird'
    assert fams["fastpath_vm_backup_bytes_stored"].samples[0].value == 4
    assert fams["fastpath_vm_backup_success"].samples[0].value == 1


class Hook(http.server.BaseHTTPRequestHandler):
    bodies: list = []
    fail_first = 0

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if Hook.fail_first:
            Hook.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        Hook.bodies.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def hook():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    Hook.bodies = []
    yield srv
    srv.shutdown()
    srv.server_close()


def test_webhook_retries_then_delivers(hook, monkeypatch):
    monkeypatch.setattr(sinks.time, "sleep", lambda s: None)
    Hook.fail_first = 1
    ok, attempts, err = sinks.post_webhook(f"http://127.0.0.1:{hook.server_port}/x", report())
    assert (ok, attempts, err) == (True, 2, None)
    assert Hook.bodies[0]["job"] == "nightly"


def test_webhook_never_raises(monkeypatch):
    monkeypatch.setattr(sinks.time, "sleep", lambda s: None)
    ok, attempts, err = sinks.post_webhook("http://127.0.0.1:1/x", report(), retries=2)
    assert not ok and attempts == 2 and err
