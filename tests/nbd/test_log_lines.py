"""The agent's log is one line per record: what clients and SR files control (export names,
locator strings, request paths) cannot forge a line (review of the SR fix, F5)."""

import logging
import socket
import struct
import sys

from agent.daemon import OneLineFormatter


def _record(msg, args, exc_info=None):
    return logging.LogRecord("fastpath.agent", logging.WARNING, "f", 1, msg, args, exc_info)


def test_control_characters_are_escaped():
    f = OneLineFormatter("%(levelname)s %(message)s")
    out = f.format(_record("refused: %s", ("x\n2026-12-08 INFO fastpath.agent: forged\r\x1b[2J",)))
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    assert out == "WARNING refused: x\\x0a2026-12-08 INFO fastpath.agent: forged\\x0d\\x1b[2J"
    assert f.format(_record("tab\tstays", ())) == "WARNING tab\tstays"


def test_a_traceback_stays_under_its_record():
    f = OneLineFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        out = f.format(_record("failed: %s", ("a\nb",), sys.exc_info()))
    first, *rest = out.split("\n")
    assert first == "WARNING failed: a\\x0ab"
    assert rest and all(line.startswith("    ") for line in rest), rest


def test_the_daemon_logs_a_hostile_export_name_on_one_line(file_sr, agent_proc):
    """A real agent: an NBD client asks for an export whose name holds a newline and a fake
    log line; the agent's log shows it escaped."""
    vdi = file_sr.qemu_vdi(1 << 20)
    agent = agent_proc([file_sr.root])
    agent.ticket(vdi)
    s = socket.create_connection((agent.host, agent.port), timeout=10)
    try:
        greeting = s.recv(18)
        assert greeting[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
        name = b"\nFORGED"
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(payload)) + payload)  # NBD_OPT_GO
        s.settimeout(10)
        s.recv(4096)
    finally:
        s.close()
    log = agent.log()
    assert "\\x0aFORGED" in log or "\\nFORGED" in log, log[-2000:]
    assert not any(line.startswith("FORGED") for line in log.splitlines())
