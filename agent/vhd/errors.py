"""Typed errors of the VHD library. Every message names the file and, where it applies, the field."""


class VhdError(Exception):
    """Base class: anything wrong with a VHD file or chain (never a bug of ours)."""

    def __init__(self, path, message, field=None):
        self.path = path
        self.field = field
        self.detail = message
        if field:
            text = "%s: %s: %s" % (path, field, message)
        else:
            text = "%s: %s" % (path, message)
        Exception.__init__(self, text)


class CorruptVhd(VhdError):
    """The file claims to be a VHD but a field is inconsistent, out of bounds or fails its checksum."""


class UnsupportedVhd(VhdError):
    """A valid file we refuse on purpose: poisoned, encrypted, QCOW2, too large, unknown disk type."""


class ChainError(VhdError):
    """The chain cannot be assembled: missing parent, wrong parent uuid, loop, too deep, not an ancestor."""
