"""Gateway API keys: shown once, stored only as a salted HMAC, checked in constant time.

A key reads `llm-<id>-<secret>`: `id` is 12 hex digits (public: it names the key in listings, audit
entries and metrics), `secret` is 32 random bytes in URL-safe base64. The store keeps, per key, in
`<store>/gateway/api-keys.json` (mode 0600, replaced atomically):

    {"format": "lmloom.gateway.api-keys", "version": 1,
     "keys": [{"id": "3f9c0a1b2c4d", "name": "ci", "salt": "<hex>", "hash": "hmac-sha256:<hex>",
               "models": ["*"], "endpoints": ["chat", "completions", "models"], "rpm": 60, "tpm": 20000,
               "burst": null, "created": "...Z", "expires": "...Z" | null, "revoked": "...Z" | null}]}

Why HMAC-SHA256 and not scrypt: the secret has 256 random bits, so nobody can enumerate candidates
and a slow hash protects nothing; a fast hash keeps verification in microseconds on every request.
The per-key salt means a leaked file does not even let two stores' entries be compared.

`ApiKeyStore.verify` answers one of: ok, missing, malformed, unknown (no such id, or the secret is
wrong: the caller cannot tell which), revoked, expired. Revoked and expired are reported only to a
holder of the right secret. Scope (model, endpoint) is checked by `ApiKeyRecord.allows_*`. The file is
re-read when it changes, so `lmloom keys api revoke` takes effect on a running gateway at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from lmloom.artifacts.atomic import write_text_atomic
from lmloom.errors import ConfigError, IntegrityError

FORMAT = "lmloom.gateway.api-keys"
VERSION = 1
KEYS_FILE = Path("gateway") / "api-keys.json"
PREFIX = "llm"
ALL = "*"
# Endpoint scopes: what a key may call. `other` covers any route the gateway does not name (it is still
# forwarded, so only keys meant for a richer upstream should hold it); `*` is every endpoint.
ENDPOINTS = ("chat", "completions", "embeddings", "models", "tokenize", "metrics", "health", "other")
DEFAULT_ENDPOINTS = ("chat", "completions", "models")

_ID = re.compile(r"^[0-9a-f]{12}$")
_KEY = re.compile(r"^llm-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
_DUMMY_SALT = secrets.token_bytes(16)  # verification of an unknown id still costs one HMAC


class KeyState(str, Enum):
    OK = "ok"
    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(timezone.utc).isoformat(timespec="seconds")


def _digest(salt: bytes, secret: str) -> str:
    return "hmac-sha256:" + hmac.new(salt, secret.encode("ascii"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    salt: str
    hash: str
    name: str = ""
    models: list[str] = field(default_factory=lambda: [ALL])
    endpoints: list[str] = field(default_factory=lambda: list(DEFAULT_ENDPOINTS))
    rpm: int | None = None  # None: the gateway config's default
    tpm: int | None = None
    burst: int | None = None  # request-bucket capacity; None: rpm (one minute's allowance)
    created: str = ""
    expires: str | None = None
    revoked: str | None = None

    def __repr__(self) -> str:  # never the hash or salt in a log line
        return f"ApiKeyRecord(id={self.id!r}, name={self.name!r}, status={self.status()!r})"

    def status(self, now: datetime | None = None) -> str:
        if self.revoked:
            return "revoked"
        if self.expires and datetime.fromisoformat(self.expires) <= (now or _now()):
            return "expired"
        return "active"

    def allows_model(self, model: str) -> bool:
        return ALL in self.models or model in self.models

    def allows_endpoint(self, endpoint: str) -> bool:
        return ALL in self.endpoints or endpoint in self.endpoints

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ApiKeyRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class AuthResult:
    state: KeyState
    record: ApiKeyRecord | None = None
    key_id: str | None = None  # the id the caller presented, when it had the shape of one

    @property
    def ok(self) -> bool:
        return self.state is KeyState.OK


def parse_duration(text: str) -> timedelta | None:
    """`30d`, `12h`, `90m`, `2w`, or `never` (None)."""
    text = text.strip().lower()
    if text in ("never", "none", ""):
        return None
    match = re.fullmatch(r"(\d+)\s*([smhdw])", text)
    if not match:
        raise ConfigError(f"--expires {text!r}: expected e.g. 30d, 12h, 90m, 2w or never")
    if int(match.group(1)) == 0:
        raise ConfigError(f"--expires {text!r}: a key must live longer than that; for no expiry say never")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
    try:
        lifetime = timedelta(**{unit: int(match.group(1))})
        _now() + lifetime  # the expiry date must exist (year <= 9999)
    except OverflowError:
        raise ConfigError(f"--expires {text!r}: too far in the future; for no expiry say never") from None
    return lifetime


def check_scopes(models: list[str], endpoints: list[str]) -> None:
    unknown = [e for e in endpoints if e != ALL and e not in ENDPOINTS]
    if unknown:
        raise ConfigError(f"endpoints scope {unknown}: unknown; allowed: {', '.join((ALL, *ENDPOINTS))}")
    if not models or not endpoints or any(not m.strip() for m in models):
        raise ConfigError("a key needs at least one model (or *) and one endpoint (or *) in its scope")


class ApiKeyStore:
    """The key file of one store. Thread-safe; re-reads the file when its mtime or size changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, ApiKeyRecord] = {}

    @classmethod
    def for_store(cls, store_root: Path) -> ApiKeyStore:
        return cls(Path(store_root) / KEYS_FILE)

    # -- reading ---------------------------------------------------------------------------------

    def records(self) -> dict[str, ApiKeyRecord]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            with self._lock:
                self._stamp, self._records = None, {}
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._records = self._load()
                self._stamp = stamp
            return self._records

    def _load(self) -> dict[str, ApiKeyRecord]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise ValueError("unknown format")
            return {r["id"]: ApiKeyRecord.from_json(r) for r in raw["keys"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Fail closed: a damaged key file authenticates nobody rather than somebody by accident.
            raise IntegrityError(f"API key file {self.path} is damaged ({exc})") from None

    def verify(self, presented: str | None) -> AuthResult:
        if not presented:
            return AuthResult(KeyState.MISSING)
        match = _KEY.match(presented)
        if not match:
            return AuthResult(KeyState.MALFORMED)
        key_id, secret = match.groups()
        record = self.records().get(key_id)
        salt = bytes.fromhex(record.salt) if record else _DUMMY_SALT
        expected = record.hash if record else "hmac-sha256:" + "0" * 64
        if not hmac.compare_digest(_digest(salt, secret), expected) or record is None:
            return AuthResult(KeyState.UNKNOWN, key_id=key_id)
        status = record.status()
        if status == "revoked":
            return AuthResult(KeyState.REVOKED, record, key_id)
        if status == "expired":
            return AuthResult(KeyState.EXPIRED, record, key_id)
        return AuthResult(KeyState.OK, record, key_id)

    # -- writing (the CLI) -------------------------------------------------------------------------

    @contextmanager
    def _editing(self) -> Iterator[dict[str, ApiKeyRecord]]:
        """Read-modify-write under an exclusive lock, so two CLI calls never lose each other's key."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with self._lock:
                    self._stamp = None
                records = dict(self.records())
                yield records
                self._write(records)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def create(
        self,
        *,
        name: str = "",
        models: list[str] | None = None,
        endpoints: list[str] | None = None,
        expires_in: timedelta | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        burst: int | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        """A new key; returns its record and the key itself, which exists nowhere else afterwards."""
        models = list(models or [ALL])
        endpoints = list(endpoints or DEFAULT_ENDPOINTS)
        check_scopes(models, endpoints)
        if expires_in is not None and expires_in <= timedelta(0):  # None is "never"; zero is not
            raise ConfigError(f"a key must live longer than {expires_in}; for no expiry say never")
        with self._editing() as records:
            return self._add(records, name, models, endpoints, expires_in, rpm, tpm, burst)

    def _add(self, records, name, models, endpoints, expires_in, rpm, tpm, burst) -> tuple[ApiKeyRecord, str]:
        key_id = secrets.token_hex(6)
        while key_id in records:  # pragma: no cover (2^48 ids)
            key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        now = _now()
        record = ApiKeyRecord(
            id=key_id,
            salt=salt.hex(),
            hash=_digest(salt, secret),
            name=name,
            models=models,
            endpoints=endpoints,
            rpm=rpm,
            tpm=tpm,
            burst=burst,
            created=_iso(now) or "",
            expires=_iso(now + expires_in) if expires_in is not None else None,
        )
        records[key_id] = record
        return record, f"{PREFIX}-{key_id}-{secret}"

    def revoke(self, key_id: str) -> ApiKeyRecord:
        with self._editing() as records:
            return self._revoke(records, key_id)

    def _revoke(self, records: dict[str, ApiKeyRecord], key_id: str) -> ApiKeyRecord:
        matches = [k for k in records if k.startswith(key_id)] if key_id else []
        if len(matches) != 1:
            what = "no API key" if not matches else f"{len(matches)} API keys"
            raise ConfigError(f"{what} with id {key_id!r} (see `lmloom keys api list`)")
        record = records[matches[0]]
        if not record.revoked:
            records[record.id] = replace(record, revoked=_iso(_now()))
        return records[record.id]

    def _write(self, records: dict[str, ApiKeyRecord]) -> None:
        body = {"format": FORMAT, "version": VERSION, "keys": [asdict(r) for r in records.values()]}
        write_text_atomic(self.path, json.dumps(body, indent=1) + "\n")  # mkstemp: created 0600
        os.chmod(self.path, 0o600)
        with self._lock:
            self._stamp = None  # re-read on next use
