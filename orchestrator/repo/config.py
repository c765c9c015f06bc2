"""Repository config and keys.

``config`` (JSON, no secrets)::

    {"format": "xcp-fastpath-repository", "version": 1, "id": "<32 hex>",
     "chunk_size": 2097152, "digest": "blake3", "compression": "zstd:1",
     "encryption": null | {"cipher": "aes-256-gcm", "key": "keys/<key id>"},
     "created": "2026-11-27T08:00:00Z"}

``keys/<key id>`` (JSON) holds the random 32-byte data key wrapped with AES-256-GCM under a key
derived from the passphrase with scrypt (parameters and salt stored beside it; the repository id
and key id are the associated data). The config is written last with a create-only write, so a
crashed or concurrent ``init`` never leaves a config pointing at someone else's key.

A reader refuses a format name, a version, a digest, a compression or a cipher it does not know
(UnknownFormat) rather than guessing.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from orchestrator.repo.backends.base import Backend
from orchestrator.repo.codec import CHUNK_SIZE, ChunkCodec, parse_compression
from orchestrator.repo.errors import (
    NotFound,
    PassphraseRequired,
    RepoError,
    RepoExists,
    RepoNotFound,
    UnknownFormat,
    WrongPassphrase,
)

FORMAT_NAME = "xcp-fastpath-repository"
FORMAT_VERSION = 1
KEY_FORMAT_NAME = "xcp-fastpath-key"
KEY_FORMAT_VERSION = 1
CONFIG_KEY = "config"

# scrypt cost: N=2**17, r=8 -> 128 MiB and roughly half a second, once per open.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
# Tests may lower the cost (never below this) with init_repo(scrypt_n=...) or this env variable.
TEST_KDF_ENV = "FASTPATH_INSECURE_TEST_KDF_N"
MIN_SCRYPT_N = 2**10
MAX_SCRYPT_N = 2**22  # refuse key files that would make us allocate GiBs
PASSPHRASE_ENV = "FASTPATH_PASSPHRASE"


@dataclass(frozen=True)
class RepoConfig:
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    chunk_size: int = CHUNK_SIZE
    digest: str = "blake3"
    compression: str = "zstd:1"
    encryption: dict[str, Any] | None = None  # {"cipher": "aes-256-gcm", "key": "keys/<id>"}
    version: int = FORMAT_VERSION
    created: str = ""

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "digest": self.digest,
            "compression": self.compression,
            "encryption": self.encryption,
            "created": self.created,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = CONFIG_KEY) -> RepoConfig:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnknownFormat(f"{where}: not a repository config (not JSON: {exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise UnknownFormat(f"{where}: not an xcp-fastpath repository config")
        version = doc.get("version")
        if version != FORMAT_VERSION:
            raise UnknownFormat(
                f"{where}: repository format version {version!r} is not supported "
                f"(this program reads version {FORMAT_VERSION})"
            )
        try:
            config = cls(
                id=_str(doc["id"]),
                chunk_size=int(doc["chunk_size"]),
                digest=_str(doc["digest"]),
                compression=_str(doc["compression"]),
                encryption=doc["encryption"],
                version=version,
                created=_str(doc.get("created", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UnknownFormat(f"{where}: malformed repository config ({exc!r})") from None
        config.validate(where)
        return config

    def validate(self, where: str = CONFIG_KEY) -> None:
        if self.chunk_size != CHUNK_SIZE:
            raise UnknownFormat(f"{where}: chunk size {self.chunk_size} is not supported")
        if self.digest != "blake3":
            raise UnknownFormat(f"{where}: digest {self.digest!r} is not supported")
        try:
            parse_compression(self.compression)
        except ValueError:
            raise UnknownFormat(
                f"{where}: compression {self.compression!r} is not supported"
            ) from None
        if self.encryption is not None:
            enc = self.encryption
            if not isinstance(enc, dict) or enc.get("cipher") != "aes-256-gcm":
                raise UnknownFormat(f"{where}: encryption {enc!r} is not supported")
            key = enc.get("key")
            if not isinstance(key, str) or not key.startswith("keys/"):
                raise UnknownFormat(f"{where}: encryption key reference {key!r} is invalid")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    return base64.b64decode(_str(text), validate=True)


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _wrap_aad(repo_id: str, key_id: str) -> bytes:
    return f"{KEY_FORMAT_NAME} v{KEY_FORMAT_VERSION} repo={repo_id} key={key_id}".encode()


def wrap_data_key(
    data_key: bytes, passphrase: str, repo_id: str, key_id: str, *, scrypt_n: int = SCRYPT_N
) -> bytes:
    salt = os.urandom(16)
    nonce = os.urandom(12)
    kek = _kek(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
    wrapped = AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(repo_id, key_id))
    doc = {
        "format": KEY_FORMAT_NAME,
        "version": KEY_FORMAT_VERSION,
        "id": key_id,
        "kdf": {"name": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
        "wrap": {"cipher": "aes-256-gcm", "nonce": _b64(nonce), "data": _b64(wrapped)},
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def unwrap_data_key(blob: bytes, passphrase: str, repo_id: str, where: str) -> bytes:
    try:
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT_NAME:
            raise UnknownFormat(f"{where}: not an xcp-fastpath key file")
        if doc.get("version") != KEY_FORMAT_VERSION:
            raise UnknownFormat(
                f"{where}: key file version {doc.get('version')!r} is not supported"
            )
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
        salt, nonce, data = _unb64(kdf["salt"]), _unb64(wrap["nonce"]), _unb64(wrap["data"])
        key_id = _str(doc["id"])
    except UnknownFormat:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise UnknownFormat(f"{where}: malformed key file ({exc!r})") from None
    if len(nonce) != 12:
        raise UnknownFormat(f"{where}: malformed key file (nonce of {len(nonce)} bytes)")
    kek = _kek(passphrase, salt, n, r, p)
    try:
        data_key = AESGCM(kek).decrypt(nonce, data, _wrap_aad(repo_id, key_id))
    except InvalidTag:
        raise WrongPassphrase(f"wrong passphrase for the repository key {where}") from None
    if len(data_key) != 32:
        raise UnknownFormat(f"{where}: data key of {len(data_key)} bytes")
    return data_key


def _test_kdf_n() -> int:
    text = os.environ.get(TEST_KDF_ENV)
    if not text:
        return SCRYPT_N
    n = int(text)
    if not MIN_SCRYPT_N <= n <= MAX_SCRYPT_N or n & (n - 1):
        raise ValueError(f"{TEST_KDF_ENV}={text}: not a power of two in range")
    return n


def _where(backend: Backend, key: str) -> str:
    return f"{backend.url.rstrip('/')}/{key}"


def init_repo(
    backend: Backend,
    *,
    encrypt: bool = False,
    passphrase: str | None = None,
    compression: str = "zstd:1",
    scrypt_n: int | None = None,
) -> RepoConfig:
    """Create a repository on ``backend``. RepoExists if one is already there."""
    if backend.exists(CONFIG_KEY):
        raise RepoExists(f"a repository already exists at {backend.url}")
    if encrypt and not passphrase:
        raise PassphraseRequired(
            f"a passphrase is needed to create an encrypted repository at {backend.url}"
        )
    if not encrypt and passphrase:
        raise RepoError("a passphrase was given but encryption was not requested")
    repo_id = secrets.token_hex(16)
    encryption = None
    if encrypt:
        assert passphrase is not None
        key_id = secrets.token_hex(8)
        key_name = f"keys/{key_id}"
        blob = wrap_data_key(
            os.urandom(32), passphrase, repo_id, key_id, scrypt_n=scrypt_n or _test_kdf_n()
        )
        backend.put(key_name, blob)
        encryption = {"cipher": "aes-256-gcm", "key": key_name}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = RepoConfig(id=repo_id, compression=compression, encryption=encryption, created=created)
    config.validate()
    if not backend.put_if_absent(CONFIG_KEY, config.to_json()):
        if encryption is not None:
            backend.delete(encryption["key"])
        raise RepoExists(f"a repository already exists at {backend.url}")
    return config


def read_config(backend: Backend) -> RepoConfig:
    try:
        data = backend.get(CONFIG_KEY)
    except NotFound:
        raise RepoNotFound(f"no repository at {backend.url} (no config)") from None
    return RepoConfig.from_json(data, _where(backend, CONFIG_KEY))


def load_repo(
    backend: Backend, passphrase: str | None = None, *, digest_threads: int = 1
) -> tuple[RepoConfig, ChunkCodec]:
    """Read the config (and unwrap the data key) of the repository on ``backend``."""
    config = read_config(backend)
    if not config.encrypted:
        return config, ChunkCodec(config, digest_threads=digest_threads)
    if not passphrase:
        raise PassphraseRequired(
            f"the repository at {backend.url} is encrypted: give its passphrase "
            f"({PASSPHRASE_ENV}, --passphrase-file or the prompt)"
        )
    assert config.encryption is not None
    key_name = config.encryption["key"]
    try:
        blob = backend.get(key_name)
    except NotFound:
        raise RepoError(f"missing key file {_where(backend, key_name)}") from None
    data_key = unwrap_data_key(blob, passphrase, config.id, _where(backend, key_name))
    return config, ChunkCodec(config, data_key, digest_threads=digest_threads)


def get_passphrase(
    passphrase_file: str | os.PathLike[str] | None = None,
    prompt: bool = True,
    *,
    confirm: bool = False,
    what: str = "repository",
) -> str:
    """The passphrase from a file (first line), else FASTPATH_PASSPHRASE, else a prompt."""
    if passphrase_file is not None:
        try:
            with open(passphrase_file, encoding="utf-8") as f:
                text = f.readline().rstrip("\r\n")
        except OSError as exc:
            raise PassphraseRequired(
                f"cannot read passphrase file {passphrase_file}: {exc.strerror}"
            ) from None
        if not text:
            raise PassphraseRequired(f"passphrase file {passphrase_file} is empty")
        return text
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    if not prompt or not sys.stdin.isatty():
        raise PassphraseRequired(f"no passphrase: set {PASSPHRASE_ENV} or give --passphrase-file")
    first = getpass.getpass(f"Passphrase for the {what}: ")
    if not first:
        raise PassphraseRequired("empty passphrase")
    if confirm and getpass.getpass("Same passphrase again: ") != first:
        raise PassphraseRequired("the two passphrases differ")
    return first
