"""Storage repositories: VDI uuid -> VHD chain.

File SRs (NFS, ext, ...) are mounted at <root>/<sr-uuid>/ and hold one <vdi-uuid>.vhd per VDI, whose
parents are siblings found through the parent locators. Export names and uuids never reach the
filesystem unchecked: a uuid must be a canonical lowercase uuid, and every path (the leaf and each
parent the chain walks to) must resolve (realpath) inside one of the configured roots.

LVM SRs (VG_XenStorage-<sr>/VHD-<vdi>) will be another class with the same interface
(resolve_vdi, open_chain, open_export).
"""

import os
import re
import uuid

DEFAULT_ROOTS = ("/var/run/sr-mount",)

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class SRError(Exception):
    """Base of SR lookup errors."""


class InvalidUUID(SRError, ValueError):
    pass


class VDINotFound(SRError, LookupError):
    pass


class OutsideRoots(SRError):
    """A path (leaf or parent) resolves outside every configured SR root."""


def check_uuid(value, what="uuid"):
    """Return `value` if it is a canonical lowercase uuid string, else raise InvalidUUID."""
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise InvalidUUID("%s %r is not a canonical uuid" % (what, value))
    if str(uuid.UUID(value)) != value:
        raise InvalidUUID("%s %r is not a canonical uuid" % (what, value))
    return value


class FileSR(object):
    """Resolve VDIs of file SRs under one or more mount roots."""

    def __init__(self, roots=DEFAULT_ROOTS):
        if isinstance(roots, str):
            roots = [roots]
        if not roots:
            raise ValueError("at least one SR root is needed")
        self.roots = [os.path.realpath(r) for r in roots]

    def inside_roots(self, path):
        real = os.path.realpath(path)
        for root in self.roots:
            if real == root or real.startswith(root.rstrip("/") + "/"):
                return True
        return False

    def _check_inside(self, path, what):
        if not self.inside_roots(path):
            raise OutsideRoots(
                "%s %s resolves to %s, outside the SR roots %s"
                % (what, path, os.path.realpath(path), ", ".join(self.roots))
            )

    def resolve_vdi(self, vdi_uuid, sr_uuid=None):
        """Path of <root>/<sr>/<vdi>.vhd. Without sr_uuid, every SR directory under the roots is
        searched (directories whose names are uuids)."""
        check_uuid(vdi_uuid, "VDI")
        if sr_uuid is not None:
            check_uuid(sr_uuid, "SR")
            candidates = [(root, sr_uuid) for root in self.roots]
        else:
            candidates = []
            for root in self.roots:
                try:
                    names = sorted(os.listdir(root))
                except OSError:
                    continue
                candidates.extend((root, n) for n in names if _UUID_RE.fullmatch(n))
        for root, sr in candidates:
            path = os.path.join(root, sr, vdi_uuid + ".vhd")
            if os.path.isfile(path):
                self._check_inside(path, "VDI %s" % vdi_uuid)
                return path
        where = "SR %s" % sr_uuid if sr_uuid else "any SR"
        raise VDINotFound(
            "VDI %s not found in %s under %s" % (vdi_uuid, where, ", ".join(self.roots))
        )

    def _resolve_parent(self, child, locators):
        from agent.vhd.chain import default_resolve_parent

        found = default_resolve_parent(child, locators)
        if found is not None and isinstance(found, str):
            self._check_inside(found, "parent of %s" % child.path)
        return found

    def open_chain(self, vdi_uuid, sr_uuid=None, max_depth=64):
        """Open the VDI's chain; every file of it is checked to lie inside the roots."""
        from agent.vhd import open_chain

        path = self.resolve_vdi(vdi_uuid, sr_uuid)
        chain = open_chain(path, max_depth=max_depth, resolve_parent=self._resolve_parent)
        try:
            for f in chain.files:
                self._check_inside(f.path, "chain file")
        except BaseException:
            chain.close()
            raise
        return chain

    def open_export(self, vdi_uuid, sr_uuid=None, base_uuid=None, counters=None, name=None):
        from agent.export import Export

        chain = self.open_chain(vdi_uuid, sr_uuid)
        base = None
        try:
            if base_uuid is not None:
                base = self.open_chain(base_uuid, sr_uuid)
            export = Export(chain, base, counters=counters, name=name)
            if base is not None:
                export.changed_blocks()  # fails now if the base is not an ancestor
            return export
        except BaseException:
            chain.close()
            if base is not None:
                base.close()
            raise
