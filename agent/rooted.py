"""Paths inside the SR roots, opened so that what is read is what was checked.

The agent runs as root; the directory of a file SR belongs to whoever serves it (an NFS or SMB
server, an admin of another host). Checking `realpath(path)` and then opening `path` leaves a
window: a symlink swapped in between makes the open follow it anywhere (/etc/shadow, the host's TLS
key). So the check never decides what is opened. A RootedPath is opened by:

1. resolving it (realpath) to find its real name below one of the roots; a path outside every root
   is refused (OutsideRoots);
2. stat()ing that real name (the checked file);
3. walking that real name from the root's descriptor, one component at a time, with
   O_NOFOLLOW (directories with O_DIRECTORY): a component swapped for a symlink after step 1 fails
   the walk (ELOOP/ENOTDIR) instead of being followed;
4. fstat()ing the descriptor: it must be a regular file and the checked file (same device and
   inode), else it is closed and the open refused (PathChanged).

What was opened is therefore a file reached inside the root without following anything the SR's
owner controls, and inside the SR directory of the VDI it belongs to (`within`: a chain never
leaves its SR, so one SR's writer cannot make another SR's files part of its disk). With O_PATH
the leaf is pinned and fstat()ed before it is opened, so a device node is never opened. Every open of a chain member goes through this, the leaf and each parent, on every
(re)open of an export: agent.vhd.file.open_readonly calls `open_readonly()` of a path that has one.

The roots themselves (and a symlink SM made for an SR directory, e.g. /var/run/sr-mount/<uuid>
pointing elsewhere) are not followed either: a root is resolved once, when the agent starts.
Hard links are outside this defence: a file SR on its own filesystem cannot link to dom0's files.
"""

import errno
import os
import stat

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | _O_CLOEXEC
_FILE_FLAGS = (
    os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
) | _O_CLOEXEC


_O_PATH = getattr(os, "O_PATH", 0)
_PROC_FD = os.path.isdir("/proc/self/fd")


class SRError(Exception):
    """Base of SR lookup errors (agent.sr re-exports it and adds its own)."""


class OutsideRoots(SRError):
    """A path (leaf or parent) resolves outside every configured SR root."""


class PathChanged(SRError):
    """The file changed between its check and its open (a symlink or another file appeared)."""


def inside(real, root):
    return real == root or real.startswith(root.rstrip("/") + "/")


def root_of(real, roots):
    """The root (already a real path) that `real` is below, or None."""
    for root in roots:
        if inside(real, root):
            return root
    return None


def check_inside(path, roots, what, within=None):
    """The real path of `path` if it is below a root (and below `within`, its SR directory, when
    given), else OutsideRoots naming `what`. The message never says where the path leads: the
    client that asked must not learn about dom0's files from it."""
    real = os.path.realpath(path)
    if root_of(real, roots) is None:
        raise OutsideRoots(
            "%s %s resolves outside the SR roots %s" % (what, path, ", ".join(roots))
        )
    if within is not None and not inside(real, within):
        raise OutsideRoots("%s %s resolves outside its SR directory %s" % (what, path, within))
    return real


def _changed(path, why):
    return PathChanged(
        "%s changed while it was opened (%s); refusing it: the SR directory is being modified"
        % (path, why)
    )


def open_below(path, roots, what="file", within=None):
    """A read-only descriptor of the regular file `path`, opened by an O_NOFOLLOW walk from the
    root it resolves into and checked (fstat) to be the file that was checked. `within`: the SR
    directory the file must be in (an SR's chain never leaves its directory)."""
    real = check_inside(path, roots, what, within)
    root = root_of(real, roots)
    try:
        checked = os.stat(real)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise _changed(path, "it disappeared: %s" % exc.strerror) from exc
        raise
    if not stat.S_ISREG(checked.st_mode):
        raise _changed(path, "not a regular file")  # never opened: a device's open has effects
    parts = [p for p in real[len(root) :].split("/") if p]
    if not parts:
        raise OutsideRoots("%s %s is an SR root, not a file" % (what, path))
    dfd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for name in parts[:-1]:
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    raise _changed(path, "directory %s: %s" % (name, exc.strerror)) from exc
                raise
            os.close(dfd)
            dfd = nfd
        try:
            fd = _open_leaf(parts[-1], dfd, path, checked)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
                raise _changed(path, exc.strerror) from exc
            raise
    finally:
        os.close(dfd)
    try:
        _check_same(fd, path, checked)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_same(fd, path, checked):
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _changed(path, "not a regular file")
    if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
        raise _changed(path, "another file than the one checked")


def _open_leaf(name, dfd, path, checked):
    """Open `name` in directory dfd. With O_PATH (Linux) the entry is pinned without opening it,
    fstat()ed (a device swapped in is never opened: opening a tape rewinds it, a watchdog's
    close reboots the host), and only a regular file that is the checked one is then opened,
    through /proc/self/fd (the same inode, whatever the directory holds by then)."""
    if _O_PATH and _PROC_FD:
        pin = os.open(name, _O_PATH | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=dfd)
        try:
            _check_same(pin, path, checked)
            return os.open("/proc/self/fd/%d" % pin, _FILE_FLAGS & ~os.O_NOFOLLOW)
        finally:
            os.close(pin)
    return os.open(name, _FILE_FLAGS, dir_fd=dfd)


class RootedPath(str):
    """A path string that opens itself with open_below (agent.vhd.file.open_readonly asks)."""

    def __new__(cls, path, roots, what="file", within=None):
        self = str.__new__(cls, path)
        self.roots = tuple(roots)
        self.what = what
        self.within = within
        return self

    def open_readonly(self):
        return open_below(str(self), self.roots, self.what, self.within)
