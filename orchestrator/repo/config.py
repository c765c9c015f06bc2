"""Repository config, and opening (unlocking) a repository.

``config`` (JSON, no secrets)::

    {"format": "xcp-fastpath-repository", "version": 1 | 2, "id": "<32 hex>",
     "chunk_size": 2097152, "digest": "blake3", "compression": "zstd:1",
     "encryption": null | {"cipher": "aes-256-gcm", "key": "keys/<key id>"},
     "created": "2026-11-27T08:00:00Z"}

Version 1: unencrypted repositories (and encrypted ones made before version 2, read only).
Version 2: encrypted repositories whose metadata is authenticated: the config by a MAC stored in
each key file (:mod:`orchestrator.repo.keys`), indexes by keyed BLAKE3, restore point documents
by AES-GCM. Opening checks, before anything is trusted:

- a config that says "unencrypted" while ``keys/`` holds a key object is refused
  (ConfigTampered): the presence of a key means "encrypted" whatever the config says;
- a passphrase given to an unencrypted repository is refused (NotEncrypted), so a job that
  expects encryption never writes plaintext into a repository whose encryption was stripped;
- an encrypted config must match the MAC of the key file that the passphrase unwraps;
- an encrypted version 1 config opens only when asked (``--legacy-v1``,
  ``FASTPATH_ALLOW_LEGACY_V1=1``: its metadata is not authenticated), and never while a version
  2 key file exists (a v2 repository downgraded by copying in an old v1 key file).

What the storage alone cannot show (encryption stripped *and* ``keys/`` moved away, a v1
downgrade with every v2 key removed, another repository put in its place) the client's pin of
the repository catches (:mod:`orchestrator.repo.pins`, checked by the CLI).

The config is written last with a create-only write, so a crashed or concurrent ``init`` never
leaves a config pointing at someone else's key. A reader refuses a format name, a version, a
digest, a compression or a cipher it does not know (UnknownFormat) rather than guessing.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.repo.backends.base import Backend
from orchestrator.repo.codec import CHUNK_SIZE, ChunkCodec, parse_compression
from orchestrator.repo.errors import (
    ConfigTampered,
    LegacyRefused,
    NotEncrypted,
    NotFound,
    PassphraseRequired,
    RepoError,
    RepoExists,
    RepoNotFound,
    UnknownFormat,
    WrongPassphrase,
)
from orchestrator.repo.keys import (
    KEYS_PREFIX,
    MAX_KEY_FILES,
    MAX_SCRYPT_N,
    MIN_SCRYPT_N,
    SCRYPT_N,
    KeyFile,
    MetadataKeys,
    check_config_mac,
    new_key_file,
    parse_key_file,
)

FORMAT_NAME = "xcp-fastpath-repository"
FORMAT_VERSION = 2  # what this program writes for an encrypted repository
PLAIN_FORMAT_VERSION = 1  # ... and for an unencrypted one (unchanged since version 1)
CONFIG_KEY = "config"

# Tests may lower the scrypt cost (never below MIN_SCRYPT_N) with init_repo(scrypt_n=...) or this.
TEST_KDF_ENV = "FASTPATH_INSECURE_TEST_KDF_N"
PASSPHRASE_ENV = "FASTPATH_PASSPHRASE"
NEW_PASSPHRASE_ENV = "FASTPATH_NEW_PASSPHRASE"
LEGACY_ENV = "FASTPATH_ALLOW_LEGACY_V1"


def legacy_allowed_by_env() -> bool:
    return os.environ.get(LEGACY_ENV) == "1"


@dataclass(frozen=True)
class RepoConfig:
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    chunk_size: int = CHUNK_SIZE
    digest: str = "blake3"
    compression: str = "zstd:1"
    encryption: dict[str, Any] | None = None  # {"cipher": "aes-256-gcm", "key": "keys/<id>"}
    version: int = PLAIN_FORMAT_VERSION
    created: str = ""
    # every field of the document as read (unknown ones too), in canonical form: what the
    # config MAC covers; computed from the fields for a config made here
    canonical: bytes = field(default=b"", compare=False, repr=False)

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    def document(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "digest": self.digest,
            "compression": self.compression,
            "encryption": self.encryption,
            "created": self.created,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.document(), indent=2, sort_keys=True) + "\n").encode()

    def canonical_bytes(self) -> bytes:
        return self.canonical or canonical_json(self.document())

    @classmethod
    def from_json(cls, data: bytes, where: str = CONFIG_KEY) -> RepoConfig:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnknownFormat(f"{where}: not a repository config (not JSON: {exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise UnknownFormat(f"{where}: not an xcp-fastpath repository config")
        version = doc.get("version")
        if type(version) is not int or version not in (1, FORMAT_VERSION):
            raise UnknownFormat(
                f"{where}: repository format version {version!r} is not supported "
                f"(this program reads versions 1 and {FORMAT_VERSION})"
            )
        try:
            config = cls(
                id=_str(doc["id"]),
                chunk_size=int(doc["chunk_size"]),
                digest=_str(doc["digest"]),
                compression=_str(doc["compression"]),
                encryption=doc.get("encryption"),  # absent = null (then keys/ decides)
                version=version,
                created=_str(doc.get("created", "")),
                canonical=canonical_json(doc),
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
            if not isinstance(key, str) or not key.startswith(KEYS_PREFIX):
                raise UnknownFormat(f"{where}: encryption key reference {key!r} is invalid")
        elif self.version != PLAIN_FORMAT_VERSION:
            # version 2 exists for encrypted repositories only: never read one as plaintext
            raise ConfigTampered(
                f"{where}: a version {self.version} repository config without encryption: the "
                f"config was edited; refusing to open"
            )


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


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
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not encrypt:
        config = RepoConfig(id=repo_id, compression=compression, created=created)
        config.validate()
        if not backend.put_if_absent(CONFIG_KEY, config.to_json()):
            raise RepoExists(f"a repository already exists at {backend.url}")
        return config
    assert passphrase is not None
    key_id = secrets.token_hex(8)
    config = RepoConfig(
        id=repo_id,
        compression=compression,
        encryption={"cipher": "aes-256-gcm", "key": KEYS_PREFIX + key_id},
        version=FORMAT_VERSION,
        created=created,
    )
    config.validate()
    data_key = os.urandom(32)
    mac = MetadataKeys(data_key).config_mac(config.canonical_bytes())
    key_name, blob = new_key_file(
        data_key, passphrase, repo_id, mac, scrypt_n=scrypt_n or _test_kdf_n(), key_id=key_id
    )
    backend.put(key_name, blob)
    if not backend.put_if_absent(CONFIG_KEY, config.to_json()):
        backend.delete(key_name)
        raise RepoExists(f"a repository already exists at {backend.url}")
    return config


def read_config(backend: Backend) -> RepoConfig:
    try:
        data = backend.get(CONFIG_KEY)
    except NotFound:
        raise RepoNotFound(f"no repository at {backend.url} (no config)") from None
    return RepoConfig.from_json(data, _where(backend, CONFIG_KEY))


def key_names(backend: Backend) -> list[str]:
    """The key objects of the repository (one listing of ``keys/``)."""
    return sorted(info.key for info in backend.list(KEYS_PREFIX) if info.key.count("/") == 1)


@dataclass
class Unlocked:
    """A repository's config and what its passphrase unlocked.

    ``keys`` (MetadataKeys) is set for an authenticated (version 2) encrypted repository opened
    with its passphrase; ``legacy`` for a version 1 encrypted one (its metadata carries no
    authentication: read only); ``codec`` is None for an encrypted repository opened without
    its passphrase (metadata work only; nothing it reads is authenticated then)."""

    config: RepoConfig
    codec: ChunkCodec | None
    keys: MetadataKeys | None = None
    legacy: bool = False
    key: KeyFile | None = None  # the key file that opened it
    data_key: bytes | None = field(default=None, repr=False)


def unlock_repo(
    backend: Backend,
    passphrase: str | None = None,
    *,
    need_key: bool = True,
    digest_threads: int = 1,
    allow_legacy_v1: bool | None = None,
) -> Unlocked:
    """Read the config of the repository on ``backend``, check it, unwrap the data key.

    An encrypted repository of format version 1 (metadata not authenticated) opens only with
    ``allow_legacy_v1`` (default: ``FASTPATH_ALLOW_LEGACY_V1=1``), and never while ``keys/``
    holds a version 2 key file (an attacker's downgrade of a version 2 repository)."""
    config = read_config(backend)
    names = key_names(backend)
    if config.encrypted and config.version == 1:
        _check_legacy(backend, config, names, allow_legacy_v1)
    if not config.encrypted:
        if names:
            raise ConfigTampered(
                f"{_where(backend, CONFIG_KEY)} says the repository is not encrypted, but "
                f"{len(names)} key object(s) exist under {KEYS_PREFIX}: the config was edited; "
                f"refusing to open (restore the original config)"
            )
        if passphrase:
            raise NotEncrypted(
                f"the repository at {backend.url} is not encrypted, but a passphrase was given: "
                f"refusing to open (if it was encrypted, its encryption was stripped); drop "
                f"--passphrase-file / unset {PASSPHRASE_ENV} if it is meant to be unencrypted"
            )
        return Unlocked(config, ChunkCodec(config, digest_threads=digest_threads))
    if not passphrase:
        if not need_key:
            return Unlocked(config, None)
        raise PassphraseRequired(
            f"the repository at {backend.url} is encrypted: give its passphrase "
            f"({PASSPHRASE_ENV}, --passphrase-file or the prompt)"
        )
    key, data_key = _unwrap_any(backend, config, names, passphrase)
    codec = ChunkCodec(config, data_key, digest_threads=digest_threads)
    where = _where(backend, CONFIG_KEY)
    if key.version == 1:
        if config.version != 1:
            raise ConfigTampered(
                f"{where}: a version {config.version} config opened by a version 1 key "
                f"{key.name}: refusing to open"
            )
        return Unlocked(config, codec, None, True, key, data_key)
    keys = MetadataKeys(data_key)
    check_config_mac(key, keys, config.canonical_bytes(), where)
    if config.version != FORMAT_VERSION:  # the MAC covers the version: not reached
        raise ConfigTampered(f"{where}: version {config.version} under a version 2 key")
    return Unlocked(config, codec, keys, False, key, data_key)


def _check_legacy(
    backend: Backend, config: RepoConfig, names: list[str], allow: bool | None
) -> None:
    where = _where(backend, CONFIG_KEY)
    for name in names[:MAX_KEY_FILES]:
        try:
            version = parse_key_file(backend.get(name), name, _where(backend, name)).version
        except (NotFound, UnknownFormat):
            continue
        if version != 1:
            raise ConfigTampered(
                f"{where} says format version 1, but {_where(backend, name)} is a version "
                f"{version} key file: the config was edited (a downgrade); refusing to open"
            )
    if not (legacy_allowed_by_env() if allow is None else allow):
        raise LegacyRefused(
            f"{backend.url} is an encrypted repository of format version 1 (its metadata is "
            f"not authenticated: whoever can write the storage can forge it): open it only to "
            f"migrate it, with --legacy-v1 or {LEGACY_ENV}=1"
        )


def _unwrap_any(
    backend: Backend, config: RepoConfig, names: list[str], passphrase: str
) -> tuple[KeyFile, bytes]:
    """The first key file that the passphrase opens: the config's own first, then the others
    (a second key, ``fastpath repo key add``)."""
    assert config.encryption is not None
    primary = config.encryption["key"]
    if len(names) > MAX_KEY_FILES:
        raise RepoError(
            f"{backend.url}: {len(names)} objects under {KEYS_PREFIX} (more than "
            f"{MAX_KEY_FILES}): refusing to try them all"
        )
    order = ([primary] if primary in names else []) + [n for n in names if n != primary]
    if not order:
        raise RepoError(f"missing key file {_where(backend, primary)} (no key under keys/)")
    problems: list[RepoError] = []
    wrong = 0
    for name in order:
        where = _where(backend, name)
        try:
            key = parse_key_file(backend.get(name), name, where)
            return key, key.unwrap(passphrase, config.id, where)
        except NotFound:
            continue  # removed meanwhile
        except WrongPassphrase as exc:
            wrong += 1
            problems.append(exc)
        except UnknownFormat as exc:
            problems.append(exc)
    missing = "" if primary in names else f"; the config's key {primary} is missing"
    if wrong == len(problems) == 1 and not missing:
        raise problems[0]
    if wrong:
        raise WrongPassphrase(
            f"wrong passphrase: no key file of the repository at {backend.url} accepts it "
            f"({len(order)} key file(s) tried{missing})"
        )
    raise problems[0] if problems else RepoError(f"missing key file {_where(backend, primary)}")


def load_repo(
    backend: Backend, passphrase: str | None = None, *, digest_threads: int = 1
) -> tuple[RepoConfig, ChunkCodec]:
    """Read the config (and unwrap the data key) of the repository on ``backend``."""
    unlocked = unlock_repo(backend, passphrase, digest_threads=digest_threads)
    assert unlocked.codec is not None
    return unlocked.config, unlocked.codec


def get_passphrase(
    passphrase_file: str | os.PathLike[str] | None = None,
    prompt: bool = True,
    *,
    confirm: bool = False,
    what: str = "repository",
    env_name: str = PASSPHRASE_ENV,
    option: str = "--passphrase-file",
) -> str:
    """The passphrase from a file (first line), else ``env_name`` (FASTPATH_PASSPHRASE), else
    a prompt."""
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
    env = os.environ.get(env_name)
    if env:
        return env
    if not prompt or not sys.stdin.isatty():
        raise PassphraseRequired(f"no passphrase: set {env_name} or give {option}")
    first = getpass.getpass(f"Passphrase for the {what}: ")
    if not first:
        raise PassphraseRequired("empty passphrase")
    if confirm and getpass.getpass("Same passphrase again: ") != first:
        raise PassphraseRequired("the two passphrases differ")
    return first
