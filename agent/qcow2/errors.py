"""Typed errors of the QCOW2 reader. Every message names the file and, where it applies, the field.

They mirror agent.vhd.errors (same constructor, same .path/.field/.detail) so callers can report
either format's errors the same way (agent.image.image_errors() lists both).
"""


class Qcow2Error(Exception):
    """Base class: anything wrong with a QCOW2 file or chain (never a bug of ours)."""

    def __init__(self, path, message, field=None):
        self.path = path
        self.field = field
        self.detail = message
        if field:
            text = "%s: %s: %s" % (path, field, message)
        else:
            text = "%s: %s" % (path, message)
        Exception.__init__(self, text)


class CorruptQcow2(Qcow2Error):
    """The file claims to be QCOW2 but a field is inconsistent or points outside the file."""


class UnsupportedQcow2(Qcow2Error):
    """A valid image we refuse on purpose: encrypted, external data file, extended L2 entries,
    zstd compression, an unknown incompatible feature, a backing file of another format."""


class Qcow2ChainError(Qcow2Error):
    """The chain cannot be assembled: missing backing file, loop, too deep, not an ancestor."""
