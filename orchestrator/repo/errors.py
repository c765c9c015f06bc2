"""Typed errors of the repository layer.

Every message is one line and names the object (key or URL) it is about, so the CLI can print
``str(exc)`` as is. Nothing from boto3/botocore or the OS escapes a backend untranslated: backends
map foreign exceptions to these classes at their boundary.
"""

from __future__ import annotations


def one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (provider messages may hold HTML or newlines) and bound the length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class RepoError(Exception):
    """Base class of every repository error."""

    LIMIT = 300  # characters of the one-line message

    def __init__(self, message: str):
        super().__init__(one_line(message, self.LIMIT))


class NotFound(RepoError):
    """The object (or repository) does not exist. An answer, never retried."""


class RepoNotFound(NotFound):
    """No repository (no ``config`` object) at the URL."""


class RepoExists(RepoError):
    """``init`` over an existing repository."""


class CorruptChunk(RepoError):
    """A chunk object failed its checks: header, length, authentication tag or digest."""


class CorruptIndex(RepoError):
    """An index object failed its checks: magic, version, checksums, counts or truncation."""


class UnknownFormat(RepoError):
    """A repository config (or key file) of a format or version this code does not know."""


class WrongPassphrase(RepoError):
    """The passphrase does not unwrap the repository's data key."""


class PassphraseRequired(RepoError):
    """The repository is encrypted and no passphrase source was available."""


class NotEncrypted(RepoError):
    """A passphrase was given for a repository that is not encrypted."""


class LegacyRefused(RepoError):
    """An encrypted repository of format version 1 (unauthenticated metadata) opened without
    ``--legacy-v1`` / ``FASTPATH_ALLOW_LEGACY_V1=1``."""

    LIMIT = 500


class PlaintextRefused(RepoError):
    """A copy from an encrypted repository into an unencrypted one without
    ``--allow-plaintext``."""

    LIMIT = 500  # names two repositories and what to do


class Tampered(RepoError):
    """An object that the repository key authenticates does not match: edited, moved, replaced
    or replayed (config, restore point document, or what a restore point names)."""


class ConfigTampered(Tampered):
    """The repository config no longer matches what its key authenticates (or says
    "unencrypted" while key objects exist): the repository is refused, not obeyed."""


class IndexTampered(CorruptIndex):
    """An index failed its keyed authentication (spliced entry, swapped between VMs or disks,
    replayed under another restore point)."""


class BackendError(RepoError):
    """A backend operation failed (I/O error, or an S3 error after the retry policy)."""


class PermanentBackendError(BackendError):
    """An error that retrying cannot heal: bad credentials, missing bucket, access denied..."""


class RetryDeadlineExceeded(BackendError):
    """The retry policy kept failing until its deadline; the message names the last cause."""
