"""Storage repositories: VDI uuid -> an open, guarded export of its chain.

File SRs (NFS, ext, SMB, ...) are mounted at <root>/<sr-uuid>/ and hold one <vdi-uuid>.vhd or (XCP-ng
8.3) <vdi-uuid>.qcow2 per VDI, whose parents are siblings found through the parent locators (VHD)
or the backing file name (QCOW2: SM writes a bare `<uuid>.qcow2`, or an absolute path). Export names and uuids never reach the
filesystem unchecked: a uuid must be a canonical lowercase uuid, and every path (the leaf and each
parent the chain walks to) must resolve (realpath) inside one of the configured roots. What is
opened is never decided by that check: each file is opened by an O_NOFOLLOW walk from its root's
descriptor and fstat()ed against the checked file (agent.rooted), on every open of an export, so a
symlink swapped into the SR directory is refused, never followed.

LVM SRs are the volume groups VG_XenStorage-<sr-uuid> with one LV per VDI: VHD-<uuid> (a VHD inside
the LV, which may be larger than the VHD), QCOW2-<uuid> (a QCOW2 image) or LV-<uuid> (raw). Volumes
are found with `lvs` and activated for the read (agent.lvm); parents are looked up in the same
volume group (by uuid for VHD, by the backing name's last component for QCOW2; paths are never
followed).

The format comes from the name SM gave the VDI and must agree with the content (agent.image
detects it by magic): a QCOW2 image behind a .vhd name, or a chain mixing formats, is refused with
UnsupportedFormat.

Opening an export (docs/consistency.md):
1. find the VDI (`<uuid>.vhd` / `<uuid>.qcow2` files, `VHD-`/`QCOW2-`/`LV-<uuid>` LVs);
2. pause SM's GC on the SR: hold its `running` lock (agent.smlock), asking a running GC to abort;
3. under SM's `sr` lock, held only for this step: open every file of the chain (and the base's),
   activating LVs as needed;
4. an Export that holds those files open with a ChainGuard; closing it closes the files,
   deactivates what we activated and lets the GC run again.
"""

import os
import re
import uuid

from agent import smlock
from agent.image import FORMAT_QCOW2, FORMAT_VHD
from agent.lvm import QCOW2_PREFIX, RAW_PREFIX, VG_PREFIX, VHD_PREFIX
from agent.rooted import OutsideRoots, PathChanged, RootedPath, SRError, check_inside  # noqa: F401

DEFAULT_ROOTS = ("/var/run/sr-mount",)
FALLBACK_TRANSPORT = "xapi-nbd"

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_QCOW2_MAGIC = b"QFI\xfb"


class InvalidUUID(SRError, ValueError):
    pass


class VDINotFound(SRError, LookupError):
    pass


class VDIAmbiguous(SRError, LookupError):
    """A VDI uuid found in several SRs while no SR was named."""


class UnsupportedFormat(SRError):
    """The VDI is stored in a way the agent does not serve (a name that lies about the format,
    a chain mixing VHD and QCOW2); names the fallback."""


def check_uuid(value, what="uuid"):
    """Return `value` if it is a canonical lowercase uuid string, else raise InvalidUUID."""
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise InvalidUUID("%s %r is not a canonical uuid" % (what, value))
    if str(uuid.UUID(value)) != value:
        raise InvalidUUID("%s %r is not a canonical uuid" % (what, value))
    return value


def format_refusal(vdi_uuid, what):
    return UnsupportedFormat(
        "VDI %s: %s: the fastpath agent does not serve it; back it up through XAPI's NBD instead "
        "(--transport %s)" % (vdi_uuid, what, FALLBACK_TRANSPORT)
    )


def qcow2_refusal(vdi_uuid, where):
    """A QCOW2 image where SM's naming says VHD (or in the middle of a VHD chain)."""
    return format_refusal(
        vdi_uuid, "%s is a QCOW2 image inside a VHD chain or under a VHD name" % where
    )


def _name_format(path):
    return FORMAT_QCOW2 if path.endswith(".qcow2") else FORMAT_VHD


def _is_qcow2(path_or_fd):
    try:
        if isinstance(path_or_fd, int):
            return os.pread(path_or_fd, 4, 0) == _QCOW2_MAGIC
        from agent.vhd.file import open_readonly

        fd = open_readonly(path_or_fd)  # never follows a RootedPath's symlinks, nor blocks
        try:
            return os.pread(fd, 4, 0) == _QCOW2_MAGIC
        finally:
            os.close(fd)
    except Exception:  # unreadable, refused, changed: not a QCOW2 as far as errors go
        return False


def _no_locks():
    return smlock.SMLocks(lock_dir=None)


class _Located(object):
    """Where a VDI is: its SR uuid and what the SR class needs to open it."""

    def __init__(self, sr_uuid, vdi_uuid, where, extra=None):
        self.sr_uuid = sr_uuid
        self.vdi_uuid = vdi_uuid
        self.where = where
        self.extra = extra


class _SRBase(object):
    locks = None

    def locate(self, vdi_uuid, sr_uuid=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def _open_located(self, loc, cleanup, max_depth=64):  # pragma: no cover - abstract
        raise NotImplementedError

    def open_export(self, vdi_uuid, sr_uuid=None, base_uuid=None, counters=None, name=None):
        """An Export of the VDI (relative to base_uuid in the same SR), GC paused while it lives."""
        from agent.export import Export

        loc = self.locate(vdi_uuid, sr_uuid)
        base_loc = self.locate(base_uuid, loc.sr_uuid) if base_uuid is not None else None
        cleanup = []
        chain = base = None
        try:
            pause = self.locks.pause_gc(loc.sr_uuid)
            cleanup.append(pause.release)
            with self.locks.sr_locked(loc.sr_uuid):
                chain = self._open_located(loc, cleanup)
                if base_loc is not None:
                    base = self._open_located(base_loc, cleanup)
            export = Export(chain, base, counters=counters, name=name, guard=True, on_close=cleanup)
        except BaseException:
            for c in (chain, base):
                if c is not None:
                    c.close()
            for cb in reversed(cleanup):
                try:
                    cb()
                except Exception:
                    pass
            raise
        try:
            if base is not None:
                export.changed_blocks()  # fails now if the base is not an ancestor
        except BaseException:
            export.close()
            raise
        return export

    def open_chain(self, vdi_uuid, sr_uuid=None, max_depth=64):
        """The VDI's chain without locks or guard (inspection; the caller closes it). LVs this
        activates stay active until release_chain(chain)."""
        loc = self.locate(vdi_uuid, sr_uuid)
        cleanup = []
        chain = self._open_located(loc, cleanup, max_depth=max_depth)
        chain.release = cleanup
        return chain


def _base_name(path):
    """The last component of a locator's path ('/' or '\\' separated), '' for none or '..'."""
    name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return "" if name in ("", ".", "..") else name


def _within(level):
    """The SR directory a chain member was opened in (its RootedPath's), else None."""
    return getattr(level.path, "within", None)


class FileSR(_SRBase):
    """Resolve VDIs of file SRs under one or more mount roots."""

    def __init__(self, roots=DEFAULT_ROOTS, locks=None):
        if isinstance(roots, str):
            roots = [roots]
        if not roots:
            raise ValueError("at least one SR root is needed")
        self.roots = [os.path.realpath(r) for r in roots]
        self.locks = locks if locks is not None else _no_locks()

    def inside_roots(self, path):
        try:
            check_inside(path, self.roots, "path")
        except OutsideRoots:
            return False
        return True

    def _rooted(self, path, what, within=None):
        """`path` checked to resolve inside the roots (and inside `within`, the real path of its
        SR directory), as a RootedPath: every open of it (now and on a reopen) walks from the
        root with O_NOFOLLOW and checks what it opened."""
        check_inside(path, self.roots, what, within)
        return RootedPath(path, self.roots, what, within)

    def _candidates(self, sr_uuid):
        if sr_uuid is not None:
            check_uuid(sr_uuid, "SR")
            return [(root, sr_uuid) for root in self.roots]
        out = []
        for root in self.roots:
            try:
                names = sorted(os.listdir(root))
            except OSError:
                continue
            out.extend((root, n) for n in names if _UUID_RE.fullmatch(n))
        return out

    def resolve_vdi(self, vdi_uuid, sr_uuid=None):
        """Path of <root>/<sr>/<vdi>.vhd (or .qcow2). Without sr_uuid, every SR directory under the
        roots is searched (directories whose names are uuids)."""
        return self.locate(vdi_uuid, sr_uuid).where

    def locate(self, vdi_uuid, sr_uuid=None):
        """Where the VDI is. Without sr_uuid every SR is searched, and a VDI found in several
        SRs is refused (whoever writes one SR could otherwise shadow another SR's VDI with a file
        of the same name in a directory sorted first): the ticket must name its SR."""
        check_uuid(vdi_uuid, "VDI")
        found = []
        for root, sr in self._candidates(sr_uuid):
            for ext in (".vhd", ".qcow2"):  # SM's FileVDI tries .vhd first too
                path = os.path.join(root, sr, vdi_uuid + ext)
                if os.path.isfile(path):
                    found.append((root, sr, path))
                    break
        if len(found) > 1:
            raise VDIAmbiguous(
                "VDI %s is in several SRs (%s): the ticket must name its SR"
                % (vdi_uuid, ", ".join(sorted(sr for _r, sr, _p in found)))
            )
        if found:
            root, sr, path = found[0]
            what = "VDI %s" % vdi_uuid
            within = check_inside(os.path.join(root, sr), self.roots, "SR directory %s" % sr)
            return _Located(sr, vdi_uuid, self._rooted(path, what, within))
        where = "SR %s" % sr_uuid if sr_uuid else "any SR"
        raise VDINotFound(
            "VDI %s not found in %s under %s" % (vdi_uuid, where, ", ".join(self.roots))
        )

    def _resolve_parent(self, child, locators):
        from agent.vhd.chain import default_resolve_parent

        # A file SR's chain lives in one directory: a parent is looked up by its file name
        # beside the child only (never by a path a locator names elsewhere: no stat() of dom0's
        # files on an SR writer's behalf, no other SR's file as our parent).
        siblings = [(code, _base_name(p)) for code, p in locators if _base_name(p)]
        found = default_resolve_parent(child, siblings)
        if found is not None and isinstance(found, str):
            found = self._rooted(found, "parent of %s" % child.path, _within(child))
        return found

    def _resolve_backing(self, child, name):
        from agent.qcow2 import default_resolve_backing

        if not (name.startswith("json:") or "://" in name):  # (those are refused as they are)
            name = _base_name(name) or name
        found = default_resolve_backing(child, name)
        if found is not None:
            found = self._rooted(found, "backing file of %s" % child.path, _within(child))
        return found

    def _open_located(self, loc, cleanup, max_depth=64):
        from agent import image
        from agent.vhd import VhdError

        path = loc.where
        found = image.detect(path)
        if found != _name_format(path):
            raise format_refusal(
                loc.vdi_uuid, "%s holds a %s image, not what its name says" % (path, found.upper())
            )
        try:
            chain = image.open_chain(
                path,
                max_depth=max_depth,
                resolve_parent=self._resolve_parent,
                resolve_backing=self._resolve_backing,
                fmt=found,
            )
        except VhdError as exc:
            # the leaf, or a parent (whose error is the cause of the chain error)
            cur = exc
            while isinstance(cur, VhdError):
                bad = getattr(cur, "path", None)
                if bad and self.inside_roots(bad) and _is_qcow2(self._rooted(bad, "chain file")):
                    raise qcow2_refusal(loc.vdi_uuid, bad) from exc
                cur = cur.__cause__
            raise
        try:
            for f in chain.files:
                check_inside(f.path, self.roots, "chain file", _within(f) or loc.where.within)
        except BaseException:
            chain.close()
            raise
        return chain


# --- LVM ------------------------------------------------------------------------------------------


def vhd_physical_end(level):
    """End of the VHD's metadata and data inside a larger device, as vhd-util computes it
    (libvhd vhd_end_of_data): the furthest of the footer copy, header, BAT, batmap, parent locator
    areas and allocated blocks (whole blocks). The footer goes right after it."""
    from agent.vhd import format as fmt

    f, h = level.footer, level.header
    ends = [fmt.FOOTER_SIZE]
    if h is None:
        return level.size + fmt.FOOTER_SIZE  # fixed: data, then the footer
    ends.append(f.data_offset + fmt.HEADER_SIZE)
    bat_end = h.table_offset + fmt.sectors_padded(h.max_table_entries * 4)
    ends.append(bat_end)
    try:
        raw = os.pread(level.fileno(), fmt.SECTOR, bat_end)
        if raw[:8] == fmt.BATMAP_COOKIE:
            bh = fmt.BatmapHeader.parse(raw)
            ends.append(bat_end + fmt.SECTOR)
            ends.append(bh.batmap_offset + bh.batmap_size * fmt.SECTOR)
    except OSError:
        pass
    for loc in h.locators:
        if loc.code and loc.data_offset:
            ends.append(loc.data_offset + max(loc.space_bytes(), loc.data_length))
    full = level.bitmap_size + level.block_size
    allocated = [e for e in level.bat if e != fmt.BAT_UNUSED]
    if allocated:
        ends.append(max(allocated) * fmt.SECTOR + full)
    return max(ends)


def open_lv_vhd(path, fd, device_end):
    """A VhdFile for the VHD inside an LV: its logical end is the device's end when the footer is
    there (inflated LV), else the physical end computed from the metadata when a footer sits there
    (deflated LV: vhd-util moved it), else the device's end (the footer copy at offset 0 is then the
    only footer; reads stay bounded by the BAT). Bounded: one extra 512-byte read."""
    from agent.vhd import VhdFile
    from agent.vhd import format as fmt

    probe = VhdFile.open(path, fd=fd, end=device_end, own_fd=False)
    if probe.footer_at != "copy" or probe.header is None:
        return VhdFile.open(path, fd=fd, end=device_end, own_fd=True)
    end = vhd_physical_end(probe) + fmt.FOOTER_SIZE
    if end < device_end:
        data = os.pread(fd, fmt.FOOTER_SIZE, end - fmt.FOOTER_SIZE)
        if data[:8] == fmt.FOOTER_COOKIE:
            found = fmt.Footer.parse(data)
            if found.checksum_ok() and found.uuid == probe.footer.uuid:
                return VhdFile.open(path, fd=fd, end=end, own_fd=True)
    return VhdFile.open(path, fd=fd, end=device_end, own_fd=True)


def _device_end(fd):
    import stat as stat_mod

    st = os.fstat(fd)
    if stat_mod.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)


class LVMSR(_SRBase):
    """VDIs of SM's LVM SRs (VG_XenStorage-<sr>), through agent.lvm.LVM."""

    def __init__(self, lvm, locks=None):
        self.lvm = lvm
        self.locks = locks if locks is not None else _no_locks()

    def locate(self, vdi_uuid, sr_uuid=None):
        check_uuid(vdi_uuid, "VDI")
        vg = None
        if sr_uuid is not None:
            check_uuid(sr_uuid, "SR")
            vg = VG_PREFIX + sr_uuid
        vols = self.lvm.list_volumes(vg)
        for prefix in (VHD_PREFIX, QCOW2_PREFIX, RAW_PREFIX):
            for (vg_name, lv), info in sorted(vols.items()):
                if lv == prefix + vdi_uuid:
                    sr = vg_name[len(VG_PREFIX) :]
                    check_uuid(sr, "SR of volume group %s" % vg_name)
                    vg_vols = {k[1]: v for k, v in vols.items() if k[0] == vg_name}
                    return _Located(sr, vdi_uuid, info, vg_vols)
        where = "volume group %s" % vg if vg else "any %s* volume group" % VG_PREFIX
        raise VDINotFound("VDI %s not found in %s" % (vdi_uuid, where))

    def _activate_open(self, info, cleanup):
        """Activate (counted) and open the LV's device; returns (fd, device end)."""
        path = self.lvm.activate(info)
        cleanup.append(lambda: self.lvm.release(info))
        from agent.vhd.file import open_readonly

        fd = open_readonly(path)
        try:
            return fd, _device_end(fd)
        except BaseException:
            os.close(fd)
            raise

    def _open_level(self, info, cleanup):
        from agent.vhd import RawFile, UnsupportedVhd

        fd, end = self._activate_open(info, cleanup)
        try:
            if _is_qcow2(fd):
                raise qcow2_refusal(info.name.split("-", 1)[-1], "LV %s/%s" % (info.vg, info.name))
            if info.name.startswith(RAW_PREFIX):
                return RawFile.open(info.path, fd=fd, end=end, own_fd=True)
            try:
                return open_lv_vhd(info.path, fd, end)
            except UnsupportedVhd:
                raise
        except BaseException:
            os.close(fd)
            raise

    def _parent_volume(self, child, vols):
        from agent.vhd import ChainError

        if child.parent_uuid.int == 0:
            # Raw parent: LVHD names it in the header and locators as LV-<uuid>.
            names = [child.header.parent_name] + [
                os.path.basename(p) for _c, p in child.parent_locators()
            ]
            for n in names:
                if n.startswith(RAW_PREFIX) and _UUID_RE.fullmatch(n[len(RAW_PREFIX) :]):
                    info = vols.get(n)
                    if info is not None:
                        return info
            raise ChainError(
                child.path,
                "raw parent (%s) not found in the volume group" % ", ".join(n for n in names if n)
                or "no name",
                "parent locator",
            )
        name = VHD_PREFIX + str(child.parent_uuid)
        info = vols.get(name)
        if info is None:
            raise ChainError(
                child.path,
                "parent %s not found in the volume group" % name,
                "parent_uuid",
            )
        return info

    def _open_qcow2(self, info, vols, cleanup, max_depth):
        """A QCOW2-<uuid> LV's chain. Backing files are the LVs named by the last component of
        the backing name (SM writes /dev/VG_XenStorage-<sr>/QCOW2-<uuid> or .../LV-<uuid> for
        a raw parent) in the same volume group; each is activated like the leaf."""
        from agent import qcow2

        def resolve_backing(child, name):
            lv = name.rstrip("/").rsplit("/", 1)[-1]
            pinfo = None
            for prefix in (QCOW2_PREFIX, RAW_PREFIX):
                if lv.startswith(prefix) and _UUID_RE.fullmatch(lv[len(prefix) :]):
                    pinfo = vols.get(lv)
            if pinfo is None:
                raise qcow2.Qcow2ChainError(
                    child.path,
                    "backing file %s is not a QCOW2-/LV- volume of the volume group" % name,
                    "backing file name",
                )
            pfd, pend = self._activate_open(pinfo, cleanup)
            want = "raw" if lv.startswith(RAW_PREFIX) else "qcow2"
            try:
                return qcow2.open_level(pinfo.path, fd=pfd, end=pend, own_fd=True, fmt_name=want)
            except BaseException:
                os.close(pfd)
                raise

        fd, end = self._activate_open(info, cleanup)
        try:
            if not qcow2.is_qcow2(fd):
                raise format_refusal(
                    info.name.split("-", 1)[-1],
                    "LV %s/%s has no QCOW2 magic" % (info.vg, info.name),
                )
            return qcow2.open_chain(
                info.path,
                max_depth=max_depth,
                resolve_backing=resolve_backing,
                fd=fd,
                end=end,
                own_fd=True,
            )
        except BaseException:
            os.close(fd)
            raise

    def _open_located(self, loc, cleanup, max_depth=64):
        from agent.vhd import Chain, RawFile, open_chain

        info, vols = loc.where, loc.extra
        if info.name.startswith(QCOW2_PREFIX):
            return self._open_qcow2(info, vols, cleanup, max_depth)
        leaf = self._open_level(info, cleanup)
        if isinstance(leaf, RawFile):
            return Chain([leaf])

        def resolve_parent(child, locators):
            pinfo = self._parent_volume(child, vols)
            return self._open_level(pinfo, cleanup)

        # open_chain takes the leaf by fd; the leaf we opened keeps owning that fd.
        try:
            chain = open_chain(
                info.path,
                max_depth=max_depth,
                resolve_parent=resolve_parent,
                allow_raw=False,
                fd=leaf.fileno(),
                end=leaf.end,
            )
        except BaseException:
            leaf.close()
            raise
        cleanup.append(leaf.close)
        return chain


class Storage(_SRBase):
    """File SRs and (when enabled) LVM SRs behind one interface (what the daemon uses)."""

    def __init__(self, file_sr, lvm_sr=None):
        self.file_sr = file_sr
        self.lvm_sr = lvm_sr
        self.locks = file_sr.locks
        self.roots = file_sr.roots

    def _backend(self, vdi_uuid, sr_uuid):
        from agent.lvm import LVMError

        try:
            return self.file_sr, self.file_sr.locate(vdi_uuid, sr_uuid)
        except VDINotFound as exc:
            if self.lvm_sr is None:
                raise
            not_file = str(exc)
        try:
            return self.lvm_sr, self.lvm_sr.locate(vdi_uuid, sr_uuid)
        except (VDINotFound, LVMError) as exc:
            raise VDINotFound("%s; not on an LVM SR either: %s" % (not_file, exc)) from exc

    def locate(self, vdi_uuid, sr_uuid=None):
        backend, loc = self._backend(vdi_uuid, sr_uuid)
        loc.backend = backend
        return loc

    def _open_located(self, loc, cleanup, max_depth=64):
        return loc.backend._open_located(loc, cleanup, max_depth=max_depth)

    def resolve_vdi(self, vdi_uuid, sr_uuid=None):
        return self.file_sr.resolve_vdi(vdi_uuid, sr_uuid)


def from_config(cfg, runner=None):
    """The daemon's Storage from an agent.config.Config."""
    from agent.lvm import LVM

    locks = smlock.SMLocks(
        lock_dir=getattr(cfg, "sm_lock_dir", smlock.DEFAULT_LOCK_DIR) or None,
        ipc_dir=getattr(cfg, "sm_ipc_dir", smlock.DEFAULT_IPC_DIR) or None,
        abort_timeout=getattr(cfg, "gc_abort_timeout", smlock.DEFAULT_ABORT_TIMEOUT),
        sr_lock_timeout=getattr(cfg, "sr_lock_timeout", smlock.DEFAULT_SR_LOCK_TIMEOUT),
    )
    file_sr = FileSR(cfg.sr_roots, locks=locks)
    lvm_sr = None
    enabled = cfg.lvm_enabled() if hasattr(cfg, "lvm_enabled") else bool(getattr(cfg, "lvm", False))
    if enabled:
        lvm = LVM(
            runner=runner,
            lvs=getattr(cfg, "lvm_lvs", "lvs"),
            lvchange=getattr(cfg, "lvm_lvchange", "lvchange"),
            dev_dir=getattr(cfg, "lvm_dev_dir", "/dev"),
        )
        lvm_sr = LVMSR(lvm, locks=locks)
    return Storage(file_sr, lvm_sr)
