"""Key files (``keys/<key id>``) and the keys derived from a repository's data key.

A key file holds the random 32-byte data key wrapped with AES-256-GCM under a key-encryption key
derived from a passphrase with scrypt. An encrypted repository may have several key files (a
second passphrase, a paper backup): each wraps the same data key, any one opens the repository.

Key file, version 2 (JSON)::

    {"format": "xcp-fastpath-key", "version": 2, "id": "<16 hex>", "repository": "<32 hex>",
     "created": "...", "label": "...",
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<b64>"},
     "wrap": {"cipher": "aes-256-gcm", "nonce": "<b64>", "data": "<b64>"},
     "config_mac": "<64 hex>"}

The wrap's associated data is ``xcp-fastpath-key v<version> repo=<repository> key=<id>``, so a
key file is bound to its repository and cannot be turned into another version. ``config_mac``
is keyed BLAKE3 (config key, below) of the canonical config: it authenticates the config, and
the repository refuses to open when they disagree (:func:`check_config_mac`). Version 1 key
files (no ``repository``, no ``config_mac``; repository id from the config) are read for old
repositories only.

Subkeys of the data key, BLAKE3 in key-derivation mode (a context string per use)::

    chunk digest key       "xcp-fastpath 2026-11 chunk digest key v1"   (codec.py)
    chunk cipher key       "xcp-fastpath 2026-11 chunk cipher key v1"   (codec.py)
    config MAC key         "xcp-fastpath 2026-12 config mac key v1"
    index MAC key          "xcp-fastpath 2026-12 index mac key v1"
    restore point key      "xcp-fastpath 2026-12 restore point cipher key v1"
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import blake3

from orchestrator.lazy import aead, crypto_exceptions, scrypt
from orchestrator.repo.errors import ConfigTampered, Tampered, UnknownFormat, WrongPassphrase

KEY_FORMAT_NAME = "xcp-fastpath-key"
KEY_FORMAT_VERSION = 2
KEYS_PREFIX = "keys/"
MAX_KEY_FILES = 32  # a repository with more is refused (each try costs one scrypt)

# scrypt cost: N=2**17, r=8 -> 128 MiB and roughly half a second, once per open.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
MIN_SCRYPT_N = 2**10
MAX_SCRYPT_N = 2**22  # refuse key files that would make us allocate GiBs

CONFIG_MAC_CONTEXT = "xcp-fastpath 2026-12 config mac key v1"
INDEX_MAC_CONTEXT = "xcp-fastpath 2026-12 index mac key v1"
POINT_CIPHER_CONTEXT = "xcp-fastpath 2026-12 restore point cipher key v1"
NONCE_SIZE = 12


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, got {text!r}")
    return base64.b64decode(text, validate=True)


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return scrypt.Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _wrap_aad(version: int, repo_id: str, key_id: str) -> bytes:
    return f"{KEY_FORMAT_NAME} v{version} repo={repo_id} key={key_id}".encode()


def derive_key(data_key: bytes, context: str) -> bytes:
    return blake3.blake3(data_key, derive_key_context=context).digest()


class MetadataKeys:
    """The keys that authenticate (and, for restore points, encrypt) a repository's metadata."""

    def __init__(self, data_key: bytes):
        if len(data_key) != 32:
            raise ValueError(f"a data key is 32 bytes, not {len(data_key)}")
        self._config_key = derive_key(data_key, CONFIG_MAC_CONTEXT)
        self.index_key = derive_key(data_key, INDEX_MAC_CONTEXT)
        self._point = aead.AESGCM(derive_key(data_key, POINT_CIPHER_CONTEXT))

    def config_mac(self, canonical: bytes) -> bytes:
        return blake3.blake3(canonical, key=self._config_key).digest()

    def seal(self, binding: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._point.encrypt(nonce, plaintext, binding)

    def open(self, binding: bytes, sealed: bytes, where: str) -> bytes:
        if len(sealed) < NONCE_SIZE + 16:
            raise Tampered(f"{where}: sealed object too short ({len(sealed)} bytes)")
        try:
            return self._point.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], binding)
        except crypto_exceptions.InvalidTag:
            raise Tampered(
                f"{where}: authentication failed (edited, damaged, or moved from another "
                f"restore point)"
            ) from None


@dataclass
class KeyFile:
    """A parsed key file (nothing unwrapped yet)."""

    name: str  # keys/<id>
    version: int
    id: str
    repository: str | None  # None in version 1
    kdf: tuple[int, int, int, bytes]  # n, r, p, salt
    nonce: bytes
    data: bytes
    config_mac: bytes | None
    created: str
    label: str

    def unwrap(self, passphrase: str, repo_id: str, where: str) -> bytes:
        """The data key. WrongPassphrase if the passphrase (or the repository id) is not this
        key file's."""
        n, r, p, salt = self.kdf
        aad = _wrap_aad(self.version, self.repository or repo_id, self.id)
        try:
            data_key = aead.AESGCM(_kek(passphrase, salt, n, r, p)).decrypt(
                self.nonce, self.data, aad
            )
        except crypto_exceptions.InvalidTag:
            raise WrongPassphrase(f"wrong passphrase for the repository key {where}") from None
        if len(data_key) != 32:
            raise UnknownFormat(f"{where}: data key of {len(data_key)} bytes")
        return data_key

    def info(self) -> dict[str, Any]:
        return {
            "key": self.name,
            "id": self.id,
            "version": self.version,
            "created": self.created,
            "label": self.label,
            "kdf": {"name": "scrypt", "n": self.kdf[0], "r": self.kdf[1], "p": self.kdf[2]},
        }


def parse_key_file(blob: bytes, name: str, where: str) -> KeyFile:
    try:
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT_NAME:
            raise UnknownFormat(f"{where}: not an xcp-fastpath key file")
        version = doc.get("version")
        if version not in (1, 2):
            raise UnknownFormat(f"{where}: key file version {version!r} is not supported")
        kdf, wrap = doc["kdf"], doc["wrap"]
        if kdf["name"] != "scrypt" or wrap["cipher"] != "aes-256-gcm":
            raise UnknownFormat(
                f"{where}: key derivation {kdf['name']!r}/{wrap['cipher']!r} unknown"
            )
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        if not (
            MIN_SCRYPT_N <= n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16
        ):
            raise UnknownFormat(f"{where}: scrypt parameters n={n} r={r} p={p} out of range")
        key_id = doc["id"]
        if not isinstance(key_id, str):
            raise TypeError(f"key id {key_id!r}")
        repository = config_mac = None
        if version == 2:
            repository = doc["repository"]
            if not isinstance(repository, str):
                raise TypeError(f"repository {repository!r}")
            config_mac = bytes.fromhex(doc["config_mac"])
            if len(config_mac) != 32:
                raise ValueError(f"config_mac of {len(config_mac)} bytes")
        key = KeyFile(
            name=name,
            version=version,
            id=key_id,
            repository=repository,
            kdf=(n, r, p, _unb64(kdf["salt"])),
            nonce=_unb64(wrap["nonce"]),
            data=_unb64(wrap["data"]),
            config_mac=config_mac,
            created=str(doc.get("created", "")),
            label=str(doc.get("label", "")),
        )
    except UnknownFormat:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UnknownFormat(f"{where}: malformed key file ({exc!r})") from None
    if len(key.nonce) != NONCE_SIZE:
        raise UnknownFormat(f"{where}: malformed key file (nonce of {len(key.nonce)} bytes)")
    return key


def new_key_file(
    data_key: bytes,
    passphrase: str,
    repo_id: str,
    config_mac: bytes,
    *,
    scrypt_n: int = SCRYPT_N,
    key_id: str | None = None,
    label: str = "",
) -> tuple[str, bytes]:
    """(``keys/<id>``, the bytes of a version 2 key file wrapping ``data_key``)."""
    key_id = key_id or secrets.token_hex(8)
    salt = os.urandom(16)
    nonce = os.urandom(NONCE_SIZE)
    kek = _kek(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
    wrapped = aead.AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(2, repo_id, key_id))
    doc = {
        "format": KEY_FORMAT_NAME,
        "version": KEY_FORMAT_VERSION,
        "id": key_id,
        "repository": repo_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label": label,
        "kdf": {"name": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
        "wrap": {"cipher": "aes-256-gcm", "nonce": _b64(nonce), "data": _b64(wrapped)},
        "config_mac": config_mac.hex(),
    }
    return KEYS_PREFIX + key_id, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def check_config_mac(key: KeyFile, keys: MetadataKeys, canonical: bytes, where: str) -> None:
    """ConfigTampered unless ``key`` (version 2) authenticates this config."""
    assert key.config_mac is not None
    if not hmac.compare_digest(keys.config_mac(canonical), key.config_mac):
        raise ConfigTampered(
            f"{where}: the config does not match what the repository key {key.name} "
            f"authenticates (edited or replaced): refusing to open; restore the original config"
        )
