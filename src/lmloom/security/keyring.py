"""Envelope encryption keys: random data-encryption keys (DEKs) wrapped by a key-encryption key (KEK).

Artifacts are encrypted with a DEK (`lmloom.security.encryption`); the store keeps DEKs only wrapped,
in `<store>/security/keyring.json`:

    {"format": "lmloom.keyring", "version": 1,
     "keys": [{"id": "dek-3f9c...", "created": "2025-...Z", "status": "active",
               "kek_id": "kek-81ab...", "wrapped": "<base64>"}, ...]}

`wrapped` is AES-256-GCM under the KEK: nonce (12) || ciphertext (32) || tag (16), with the associated
data b"lmloom.keyring.v1" 0x00 || DEK id, so a wrapped key cannot be moved to another id. `kek_id`
is a non-reversible fingerprint of the KEK (HMAC-SHA256 keyed by the KEK over a fixed label, first
64 bits), so a wrong or stale KEK is named without revealing anything about it. Exactly one DEK is
`active` (new artifacts use it); `retired` DEKs still decrypt what they encrypted.

The KEK never touches the store. It comes from, first match wins:

    LMLOOM_KEK            base64 of 32 bytes
    LMLOOM_KEK_FILE       a file holding that base64 text (or the 32 raw bytes), mode 0600 or stricter
    LMLOOM_KEK_PROVIDER   "package.module:Class", a `KekProvider` (wrap/unwrap, e.g. a cloud KMS) or any
                          class with `get_kek() -> bytes`; constructed without arguments

Rotation (`Keyring.rotate`) re-wraps every DEK under a new KEK: no artifact is re-encrypted, and the
keyring file is replaced atomically, so it is wrapped wholly by the old KEK or wholly by the new one.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import importlib
import json
import os
import secrets
import shlex
import stat
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lmloom.artifacts.atomic import write_bytes_atomic
from lmloom.errors import IntegrityError, SecurityError

FORMAT = "lmloom.keyring"
VERSION = 1
KEY_SIZE = 32
ACTIVE, RETIRED = "active", "retired"
_WRAP_LABEL = b"lmloom.keyring.v1\x00"
_KEK_ID_LABEL = b"lmloom kek id v1"

ENV_KEK = "LMLOOM_KEK"
ENV_KEK_FILE = "LMLOOM_KEK_FILE"
ENV_KEK_PROVIDER = "LMLOOM_KEK_PROVIDER"
NEW_KEK_PREFIX = "LMLOOM_NEW_KEK"  # LMLOOM_NEW_KEK / _FILE / _PROVIDER: the KEK `keys rotate` moves to
HOW_TO_SET = (
    f"set {ENV_KEK} (base64 of 32 bytes), {ENV_KEK_FILE} (a file with mode 0600) or "
    f"{ENV_KEK_PROVIDER} (module:Class); `lmloom keys init --generate-kek-file PATH` creates a key file"
)


# -- key-encryption keys -------------------------------------------------------------------------


@runtime_checkable
class KekProvider(Protocol):
    """A key-encryption key that wraps and unwraps DEKs. A cloud KMS implements this with its
    Encrypt/Decrypt calls (passing `context` as the encryption context) and never hands out its key."""

    @property
    def kek_id(self) -> str:
        """A stable, non-secret name of the key (a fingerprint or the KMS key's name)."""

    def wrap(self, dek: bytes, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The DEK; raise `SecurityError` when `wrapped` was not made by this key with this context."""


class LocalKek:
    """A 32-byte KEK held in this process (from the environment or a key file): AES-256-GCM wrapping."""

    __slots__ = ("__key", "kek_id", "source")

    def __init__(self, key: bytes, source: str):
        if len(key) != KEY_SIZE:
            raise SecurityError(f"the KEK from {source} is {len(key)} bytes; it must be {KEY_SIZE}")
        self.__key = bytes(key)
        self.source = source
        self.kek_id = kek_fingerprint(key)

    def __repr__(self) -> str:
        return f"LocalKek({self.kek_id} from {self.source})"

    def wrap(self, dek: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self.__key).encrypt(nonce, dek, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return AESGCM(self.__key).decrypt(wrapped[:12], wrapped[12:], context)
        except InvalidTag:
            raise SecurityError(
                f"KEK {self.kek_id} cannot unwrap this key (wrong KEK or damaged keyring)"
            ) from None


def kek_fingerprint(key: bytes) -> str:
    """A non-reversible id of a KEK: HMAC-SHA256(key, label), first 64 bits, as `kek-<16 hex>`."""
    return "kek-" + hmac.new(key, _KEK_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def generate_kek() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def _decode_key(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SecurityError(
            f"{source} is not valid base64 (expected base64 of {KEY_SIZE} random bytes)"
        ) from None
    if len(key) != KEY_SIZE:
        raise SecurityError(f"{source} decodes to {len(key)} bytes; a KEK is {KEY_SIZE} bytes")
    return key


def read_kek_file(path: Path | str) -> LocalKek:
    """A KEK from a file readable by its owner only; anything more open is refused."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except OSError as exc:
        raise SecurityError(f"key file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecurityError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SecurityError(
            f"key file {path} has mode {mode:04o}: it must be readable by its owner only "
            f"(run `chmod 600 {path}`)"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise SecurityError(f"key file {path} belongs to another user (uid {info.st_uid}); it must be yours")
    raw = path.read_bytes()
    source = f"key file {path}"
    if len(raw) == KEY_SIZE:
        return LocalKek(raw, source)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SecurityError(f"{source} holds neither {KEY_SIZE} raw bytes nor base64 text") from None
    return LocalKek(_decode_key(text, source), source)


def write_kek_file(path: Path | str, key: bytes | None = None) -> LocalKek:
    """Create a new key file (base64 text, mode 0600) that does not exist yet; return its KEK."""
    path = Path(path).expanduser()
    key = key if key is not None else generate_kek()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        if exc.filename is not None and Path(exc.filename) != path:  # a file where a folder must be
            raise SecurityError(f"key file {path}: {exc.filename} is a file, not a folder") from None
        raise SecurityError(
            f"key file {path} already exists; choose a new path (keys are never overwritten)"
        ) from None
    except OSError as exc:
        raise SecurityError(f"key file {path} cannot be created ({exc.strerror or exc})") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(base64.b64encode(key) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, 0o600)  # in case the umask or the file system widened it
    return LocalKek(key, f"key file {path}")


def load_provider(spec: str, source: str) -> KekProvider:
    """Instantiate `package.module:Class` and adapt a `get_kek()` provider to a `LocalKek`."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise SecurityError(f"{source} = {spec!r}: expected 'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise SecurityError(f"{source} = {spec!r}: cannot load it ({type(exc).__name__}: {exc})") from None
    try:
        provider = cls()
    except SecurityError:
        raise
    except Exception as exc:  # a provider's own failure (missing setting, unreachable KMS)
        raise SecurityError(
            f"{source} = {spec!r}: the provider failed to start ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(provider, KekProvider):
        return provider
    if callable(getattr(provider, "get_kek", None)):
        return LocalKek(provider.get_kek(), f"provider {spec}")
    raise SecurityError(f"{source} = {spec!r}: the class has neither kek_id/wrap/unwrap nor get_kek()")


def kek_from_env(env: Mapping[str, str] | None = None, prefix: str = "LMLOOM_KEK") -> KekProvider | None:
    """The KEK configured by `<prefix>`, `<prefix>_FILE` or `<prefix>_PROVIDER` (first set wins), or None."""
    env = os.environ if env is None else env
    if env.get(prefix):
        return LocalKek(_decode_key(env[prefix], prefix), prefix)
    if env.get(f"{prefix}_FILE"):
        return read_kek_file(env[f"{prefix}_FILE"])
    if env.get(f"{prefix}_PROVIDER"):
        return load_provider(env[f"{prefix}_PROVIDER"], f"{prefix}_PROVIDER")
    return None


def require_kek(env: Mapping[str, str] | None = None) -> KekProvider:
    kek = kek_from_env(env)
    if kek is None:
        raise SecurityError(f"no key-encryption key (KEK) is configured: {HOW_TO_SET}")
    return kek


class CommandKekProvider:
    """Example provider: the KEK is printed (base64) by a command, e.g. a secret manager's CLI.

        LMLOOM_KEK_PROVIDER=lmloom.security.keyring:CommandKekProvider
        LMLOOM_KEK_COMMAND="pass show lmloom/kek"      # or: vault kv get -field=kek secret/lmloom

    It shows the `get_kek()` form of the provider interface; a KMS-backed provider implements
    `kek_id`, `wrap` and `unwrap` instead, so the KEK never leaves the KMS.
    """

    ENV_COMMAND = "LMLOOM_KEK_COMMAND"

    def __init__(self) -> None:
        command = os.environ.get(self.ENV_COMMAND, "")
        if not command.strip():
            raise SecurityError(
                f"CommandKekProvider: set {self.ENV_COMMAND} to a command that prints the KEK"
            )
        self.argv = shlex.split(command)

    def get_kek(self) -> bytes:
        try:
            done = subprocess.run(self.argv, capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SecurityError(
                f"{self.ENV_COMMAND} ({self.argv[0]}) could not run: {type(exc).__name__}"
            ) from None
        if done.returncode != 0:
            raise SecurityError(f"{self.ENV_COMMAND} ({self.argv[0]}) exited with status {done.returncode}")
        try:
            text = done.stdout.decode("ascii")
        except UnicodeDecodeError:
            raise SecurityError(f"{self.ENV_COMMAND} printed something other than base64") from None
        return _decode_key(text, f"the output of {self.ENV_COMMAND}")


# -- the keyring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRecord:
    """One wrapped DEK as stored; holds no key material in the clear."""

    id: str
    created: str
    status: str
    kek_id: str
    wrapped: str  # base64

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "status": self.status,
            "kek_id": self.kek_id,
            "wrapped": self.wrapped,
        }


def _context(dek_id: str) -> bytes:
    return _WRAP_LABEL + dek_id.encode("utf-8")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Keyring:
    """The store's wrapped DEKs (`<store>/security/keyring.json`), read and changed under a file lock."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.lock_path = self.path.with_suffix(".lock")

    @classmethod
    def for_store(cls, root: Path | str) -> Keyring:
        return cls(Path(root) / "security" / "keyring.json")

    def exists(self) -> bool:
        return self.path.is_file()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(mode=0o700, parents=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def records(self) -> list[KeyRecord]:
        if not self.exists():
            raise SecurityError(f"this store has no keyring ({self.path}); run `lmloom keys init` first")
        where = f"keyring {self.path}"
        try:
            data = json.loads(self.path.read_bytes())
            if data.get("format") != FORMAT:
                raise ValueError("format")
            if data.get("version") != VERSION:
                raise SecurityError(
                    f"{where} has version {data.get('version')!r}; this lmloom reads {VERSION}"
                )
            records = [
                KeyRecord(**{k: str(entry[k]) for k in KeyRecord.__dataclass_fields__})
                for entry in data["keys"]
            ]
        except SecurityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            raise IntegrityError(f"{where} is damaged (not a valid {FORMAT} file)") from None
        statuses_ok = all(r.status in (ACTIVE, RETIRED) for r in records)
        if (
            not statuses_ok
            or sum(r.status == ACTIVE for r in records) != 1
            or len({r.id for r in records}) != len(records)
        ):
            raise IntegrityError(f"{where} is damaged (it must hold exactly one active key and unique ids)")
        return records

    def _save(self, records: list[KeyRecord]) -> None:
        data = {"format": FORMAT, "version": VERSION, "keys": [r.to_json() for r in records]}
        write_bytes_atomic(self.path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))  # mode 0600

    @staticmethod
    def _new_record(kek: KekProvider) -> tuple[KeyRecord, bytes]:
        dek_id = "dek-" + secrets.token_hex(8)
        dek = secrets.token_bytes(KEY_SIZE)
        wrapped = _provider_call(kek, "wrap", dek, _context(dek_id))
        record = KeyRecord(dek_id, _now(), ACTIVE, kek.kek_id, base64.b64encode(wrapped).decode("ascii"))
        return record, dek

    def check_absent(self) -> None:
        if self.exists():
            raise SecurityError(
                f"keyring {self.path} already exists; use `lmloom keys rotate` to change the KEK "
                "or start a new data key"
            )

    def init(self, kek: KekProvider) -> KeyRecord:
        """Create the keyring with a first active DEK wrapped by `kek`."""
        with self._locked():
            self.check_absent()
            record, _ = self._new_record(kek)
            self._save([record])
            return record

    def new_dek(self, kek: KekProvider) -> KeyRecord:
        """Retire the active DEK (it keeps decrypting) and add a new active one."""
        with self._locked():
            records = self.records()
            for record in records:
                self._unwrap(record, kek)  # the configured KEK must be the keyring's current one
            record, _ = self._new_record(kek)
            self._save([_with(r, status=RETIRED) for r in records] + [record])
            return record

    def rotate(self, old: KekProvider, new: KekProvider) -> list[KeyRecord]:
        """Re-wrap every DEK under `new`; data stays as it is. Returns the new records."""
        with self._locked():
            records = self.records()
            rewrapped = []
            for record in records:
                dek = self._unwrap(record, old)
                wrapped = _provider_call(new, "wrap", dek, _context(record.id))
                rewrapped.append(
                    _with(record, kek_id=new.kek_id, wrapped=base64.b64encode(wrapped).decode("ascii"))
                )
            for record in rewrapped:  # prove the new wrapping before it replaces the old one
                self._unwrap(record, new)
            self._save(rewrapped)
            return rewrapped

    def active(self, kek: KekProvider) -> tuple[str, bytes]:
        record = next(r for r in self.records() if r.status == ACTIVE)
        return record.id, self._unwrap(record, kek)

    def unwrap(self, dek_id: str, kek: KekProvider) -> bytes:
        for record in self.records():
            if record.id == dek_id:
                return self._unwrap(record, kek)
        raise SecurityError(f"key {dek_id} is not in this store's keyring ({self.path})")

    def _unwrap(self, record: KeyRecord, kek: KekProvider) -> bytes:
        if record.kek_id != kek.kek_id:
            raise SecurityError(
                f"key {record.id} is wrapped by KEK {record.kek_id}, but the configured KEK is {kek.kek_id} "
                "(a wrong key, or the keyring was rotated to a new KEK): set the KEK the keyring was last "
                "rotated to"
            )
        try:
            wrapped = base64.b64decode(record.wrapped, validate=True)
        except (binascii.Error, ValueError):
            raise IntegrityError(f"keyring {self.path}: key {record.id} is damaged") from None
        try:
            dek = _provider_call(kek, "unwrap", wrapped, _context(record.id))
        except SecurityError as exc:
            raise SecurityError(
                f"key {record.id} could not be unwrapped with KEK {kek.kek_id} ({exc}); if that is the KEK "
                f"that wrapped it, keyring {self.path} was altered"
            ) from None
        if len(dek) != KEY_SIZE:
            raise SecurityError(f"key {record.id} unwrapped to {len(dek)} bytes, expected {KEY_SIZE}")
        return dek


def _provider_call(kek: KekProvider, operation: str, data: bytes, context: bytes) -> bytes:
    """`kek.wrap` / `kek.unwrap`, with a provider's own failures (e.g. a KMS outage) as one clear error."""
    try:
        return getattr(kek, operation)(data, context)
    except SecurityError:
        raise
    except Exception as exc:
        raise SecurityError(f"KEK {kek.kek_id}: {operation} failed ({type(exc).__name__}: {exc})") from None


def _with(record: KeyRecord, **changes: str) -> KeyRecord:
    return KeyRecord(**{**record.to_json(), **changes})


class StoreKeys:
    """What the store's codecs need: the active DEK for writing, any DEK by id for reading.

    The KEK is resolved from the environment on first use, and unwrapped DEKs are kept in memory
    for the life of the process (never written anywhere).
    """

    def __init__(self, root: Path | str, env: Mapping[str, str] | None = None):
        self.keyring = Keyring.for_store(root)
        self._env = env
        self._kek: KekProvider | None = None
        self._deks: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"StoreKeys({self.keyring.path})"

    def kek(self) -> KekProvider:
        if self._kek is None:
            if not self.keyring.exists():
                raise SecurityError(
                    f"this store has no keyring ({self.keyring.path}): run `lmloom keys init` first "
                    f"(and {HOW_TO_SET})"
                )
            self._kek = require_kek(self._env)
        return self._kek

    def active(self) -> tuple[str, bytes]:
        dek_id, dek = self.keyring.active(self.kek())
        self._deks[dek_id] = dek
        return dek_id, dek

    def dek(self, dek_id: str) -> bytes:
        if dek_id not in self._deks:
            self._deks[dek_id] = self.keyring.unwrap(dek_id, self.kek())
        return self._deks[dek_id]
