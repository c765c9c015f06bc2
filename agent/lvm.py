"""LVM volumes of SM's LVM SRs (LVHD): discovery with `lvs`, activation with `lvchange`.

An LVM SR is the volume group VG_XenStorage-<sr uuid>; each VDI is one logical volume named
VHD-<vdi uuid> (a VHD inside the LV), LV-<vdi uuid> (raw) or, on XCP-ng 8.3, QCOW2-<vdi uuid>.
Inactive LVs have no device node: we activate them for the read (`lvchange -ay VG/LV`) and
deactivate them afterwards only if we were the ones who activated them, counting our own users
(several exports of one chain share one activation). The device node is <dev_dir>/<vg>/<lv>.

Commands go through a runner, runner(argv, timeout) -> (returncode, stdout, stderr), so tests can
record them (and the build machines, which have no device-mapper, can stand a loop device in for
the LV).

What we do not do: take part in SM's own activation refcounts (/var/run/sm/refcount). Instead
device-mapper protects both sides: `lvchange -an` of an LV that someone has open fails, so SM cannot
deactivate (or remove) an LV we read, and our deactivation of an LV that tapdisk opened meanwhile
fails too: such a failure is logged and the LV is left active, which is what SM expects.
"""

import collections
import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger("fastpath.lvm")

DEFAULT_TIMEOUT = 30.0
VG_PREFIX = "VG_XenStorage-"
VHD_PREFIX = "VHD-"
RAW_PREFIX = "LV-"
QCOW2_PREFIX = "QCOW2-"

LVInfo = collections.namedtuple("LVInfo", "vg name size active path")


class LVMError(Exception):
    """An LVM command failed or answered something we cannot parse (names the command)."""


def subprocess_runner(argv, timeout):
    """Run argv without a shell; (returncode, stdout, stderr) as text."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            close_fds=True,
            start_new_session=True,  # a timeout kills the whole group (children keep pipes open)
        )
    except OSError as exc:
        raise LVMError("cannot run %s: %s" % (argv[0], exc)) from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        raise LVMError("%s timed out after %gs" % (" ".join(argv), timeout)) from None
    return proc.returncode, out, err


class LVM(object):
    """lvs/lvchange with our own activation refcounts (thread-safe)."""

    def __init__(
        self,
        runner=None,
        lvs="lvs",
        lvchange="lvchange",
        dev_dir="/dev",
        timeout=DEFAULT_TIMEOUT,
    ):
        self.runner = runner or subprocess_runner
        self.lvs_cmd = lvs
        self.lvchange_cmd = lvchange
        self.dev_dir = dev_dir
        self.timeout = timeout
        self._lock = threading.Lock()
        self._active = {}  # (vg, lv) -> [users, activated_by_us]

    def _run(self, argv):
        rc, out, err = self.runner(argv, self.timeout)
        if rc != 0:
            raise LVMError(
                "%s failed (exit %s): %s" % (" ".join(argv), rc, (err or out or "").strip()[:500])
            )
        return out

    def device_path(self, vg, lv):
        return os.path.join(self.dev_dir, vg, lv)

    def list_volumes(self, vg=None):
        """{(vg, lv name): LVInfo} of one volume group, or of every VG_XenStorage-* group when vg
        is None (one `lvs` call either way)."""
        argv = [
            self.lvs_cmd,
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "--separator",
            "|",
            "-o",
            "vg_name,lv_name,lv_size,lv_attr",
        ]
        if vg is not None:
            argv.append(vg)
        out = self._run(argv)
        vols = {}
        for line in out.splitlines():
            line = line.strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split("|")]
            if len(parts) < 4:
                raise LVMError("%s: cannot parse line %r" % (self.lvs_cmd, line[:200]))
            vg_name, name, size, attr = parts[0], parts[1], parts[2], parts[3]
            if vg is None and not vg_name.startswith(VG_PREFIX):
                continue
            if "/" in vg_name or "/" in name or name.startswith(".") or vg_name.startswith("."):
                raise LVMError("%s: odd volume name %r/%r" % (self.lvs_cmd, vg_name, name))
            try:
                size = int(size.split(".")[0])
            except ValueError:
                raise LVMError("%s: bad size %r for %s" % (self.lvs_cmd, parts[2], name)) from None
            # lv_attr: 5th character 'a' = active
            active = len(attr) >= 5 and attr[4] == "a"
            vols[(vg_name, name)] = LVInfo(
                vg_name, name, size, active, self.device_path(vg_name, name)
            )
        return vols

    def activate(self, info):
        """Make sure the LV is active; counts our users. Returns the device path."""
        key = (info.vg, info.name)
        with self._lock:
            entry = self._active.get(key)
            if entry is not None:
                entry[0] += 1
                return info.path
            ours = False
            if not info.active or not os.path.exists(info.path):
                self._run([self.lvchange_cmd, "-ay", "%s/%s" % (info.vg, info.name)])
                ours = True
                log.info("activated %s/%s", info.vg, info.name)
            self._active[key] = [1, ours]
            return info.path

    def release(self, info):
        """One user less; deactivates when the last one leaves and we had activated it."""
        key = (info.vg, info.name)
        with self._lock:
            entry = self._active.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del self._active[key]
            if not entry[1]:
                return
            try:
                self._run([self.lvchange_cmd, "-an", "%s/%s" % (info.vg, info.name)])
                log.info("deactivated %s/%s", info.vg, info.name)
            except LVMError as exc:
                # Someone (tapdisk, SM) opened it meanwhile: leave it active, as they expect.
                log.warning("leaving %s/%s active: %s", info.vg, info.name, exc)

    def users(self, vg, lv):
        with self._lock:
            entry = self._active.get((vg, lv))
            return entry[0] if entry else 0
