"""Where a source's files live: a local path or any fsspec URL (s3://, gs://, memory://, ...).

A `Store` lists the files of a source (matching glob patterns, hidden ones skipped, sorted by their
path relative to the source's root), opens them for reading, and stamps them cheaply (size and mtime,
or for a remote object its size, etag and modification time) for the stage key.

`storage_options` are passed to fsspec, but they are config, and config is written into the artifact
manifest and the stage key: so options that hold secrets (key, secret, token, password, ...) may only
name an environment variable, `"${env:NAME}"`, resolved when the store is opened; literal secrets are
refused (without echoing them), and resolved values are scrubbed from every error message. For S3 the
usual way is no secret option at all: s3fs reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_PROFILE from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO

from pydantic import AfterValidator, BeforeValidator, Field

from lmloom.data.provenance import absolute_location, is_url, join_location, printable
from lmloom.errors import ConfigError, DataError

# Option names whose values are credentials (matched case-insensitively, at any depth, e.g. inside
# client_kwargs): they may only reference an environment variable.
SECRET_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passphrase",
        "session_token",
        "client_secret",
        "account_key",
        "sas_token",
        "connection_string",
        "credentials",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }
)
ENV_REFERENCE = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
_REFUSED = "<literal secret refused>"


def _location(value: Any) -> Any:
    """Local paths (and file:// URLs) become absolute Paths; other URLs stay strings."""
    if not isinstance(value, str | Path):
        raise ValueError(f"expected a path or URL string, got a {type(value).__name__}")
    if isinstance(value, str) and value.startswith("file://"):
        value = value.removeprefix("file://")
    if isinstance(value, str) and not value.strip():
        # Path("") is the current directory: an empty value must not quietly read all of it
        raise ValueError("the path is empty; give a file, directory or URL ('.' for the current directory)")
    if isinstance(value, str) and "://" in value:
        scheme, _, rest = value.partition("://")
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else value
    return Path(value).expanduser().resolve()


# Recorded absolute, so the manifest says exactly what was read and the stage key does not depend on
# the directory the recipe was run from.
AbsolutePath = Annotated[Path, AfterValidator(lambda path: path.expanduser().resolve())]

Location = Annotated[
    Path | str,
    BeforeValidator(_location),
    Field(description="a local path (made absolute) or an fsspec URL: s3://bucket/prefix, memory://x, ..."),
]


def _relative_patterns(patterns: list[str]) -> list[str]:
    # matched against paths relative to the source's root: an absolute pattern would make
    # pathlib's rglob raise, and one with ".." would reach outside the source (hidden files aside)
    for pattern in patterns:
        if not pattern.strip():
            raise ValueError("a pattern is empty")
        if Path(pattern).is_absolute() or ".." in PurePosixPath(pattern).parts:
            raise ValueError(
                f"pattern {pattern!r} must be relative to the source's path, without '..' (e.g. '*.txt', "
                "'docs/*.md'); point `path` at the directory instead"
            )
    return patterns


GlobPatterns = Annotated[list[str], AfterValidator(_relative_patterns)]


def _redact_secrets(value: Any) -> Any:
    # Runs before validation, so a refused literal secret never appears in the error's input echo.
    if not isinstance(value, dict):
        return value
    redacted = {}
    for key, item in value.items():
        if isinstance(item, dict):
            item = _redact_secrets(item)
        elif str(key).lower() in SECRET_OPTIONS and not (isinstance(item, str) and ENV_REFERENCE.match(item)):
            item = _REFUSED
        redacted[key] = item
    return redacted


def _refuse_literal_secrets(value: dict[str, Any]) -> dict[str, Any]:
    refused = sorted(_refused_keys(value))
    if refused:
        raise ValueError(
            f"storage_options {', '.join(refused)}: no literal secrets in a recipe (it would be written into the "
            'manifest): reference an environment variable instead, e.g. secret: "${env:MY_SECRET}", '
            "or leave it out and use the provider's standard variables (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)"
        )
    return value


def _refused_keys(value: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, item in value.items():
        if isinstance(item, dict):
            yield from _refused_keys(item, f"{prefix}{key}.")
        elif item == _REFUSED:
            yield f"{prefix}{key}"


StorageOptions = Annotated[
    dict[str, Any],
    AfterValidator(_refuse_literal_secrets),
    BeforeValidator(_redact_secrets),
    Field(
        description=(
            "fsspec options for a URL path (endpoint_url, anon, client_kwargs, ...); credentials only as "
            '"${env:NAME}" references, never literal values'
        )
    ),
]


def resolve_options(options: dict[str, Any], label: str) -> tuple[dict[str, Any], list[str]]:
    """The options with "${env:NAME}" references replaced, and the resolved values (for scrubbing)."""
    secrets: list[str] = []

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        match = ENV_REFERENCE.match(value) if isinstance(value, str) else None
        if match is None:
            return value
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{label}: storage_options reference ${{env:{name}}}, which is not set")
        secrets.append(os.environ[name])
        return os.environ[name]

    return resolve(options), [s for s in secrets if s]


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: its path relative to the source's root and where to open it."""

    relpath: str
    location: Path | str  # a local Path, or the URL of a remote object
    stamp: str  # size and modification time (and etag), for the cheap source fingerprint
    fs_path: str = ""  # the path fsspec knows a remote object by

    @property
    def name(self) -> str:
        return PurePosixPath(self.relpath).name

    def __str__(self) -> str:
        return printable(str(self.location))


class Store:
    """The files under one source location, local or remote."""

    def __init__(self, label: str, location: Path | str, storage_options: dict[str, Any] | None = None):
        self.label, self.location = label, location
        self.remote = is_url(location)
        self._secrets: list[str] = []
        self.fs: Any = None
        self._is_dir: bool | None = None
        self.root = str(location)
        if self.remote:
            import fsspec  # only needed, and only imported, for URL sources

            options, self._secrets = resolve_options(storage_options or {}, label)
            try:
                self.fs, self.root = fsspec.core.url_to_fs(str(location), **options)
                self.fs.invalidate_cache()  # a listing cached by an earlier read may be stale
            except Exception as exc:  # noqa: BLE001 (fsspec backends raise anything; report it in one line)
                raise DataError(f"{label}: cannot open {location}: {self.describe(exc)}") from None
            self.root = self.root.rstrip("/")

    # -- listing ---------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self._call(self.fs.exists, self.root) if self.remote else Path(self.location).exists()

    def is_dir(self) -> bool:
        if not self.remote:
            return Path(self.location).is_dir()
        if self._is_dir is None:  # asked once per file while listing: one request is enough
            self._is_dir = bool(self._call(self.fs.isdir, self.root))
        return self._is_dir

    @property
    def base(self) -> Path | str:
        """The directory relative paths are relative to: the location itself, or a file's parent."""
        if self.is_dir():
            return self.location
        return str(self.location).rsplit("/", 1)[0] if self.remote else Path(self.location).parent

    def files(self, patterns: list[str]) -> list[SourceFile]:
        """The files matching any pattern at any depth (without hidden ones), or the location itself
        when it is a file."""
        if not self.remote:
            root = Path(self.location)
            if not root.is_dir():
                return [_local_file(root, root.name)] if root.exists() else []
            return [
                _local_file(path, path.relative_to(root).as_posix())
                for path in matching_files(root, patterns)
            ]
        if not self.is_dir():
            info = self._call(self.fs.info, self.root)
            return [self._remote_file(self.root, PurePosixPath(self.root).name, info)]
        found = self._call(self.fs.find, self.root, withdirs=False, detail=True)
        files = []
        for fs_path, info in found.items():
            rel = fs_path.rstrip("/")[len(self.root) + 1 :]
            parts = PurePosixPath(rel).parts
            if not rel or info.get("type") == "directory" or any(p.startswith(".") for p in parts):
                continue
            if any(PurePosixPath(rel).match(pattern) for pattern in patterns):
                files.append(self._remote_file(fs_path, rel, info))
        return sorted(files, key=lambda f: f.relpath)

    def exists_rel(self, relpath: str) -> bool:
        """Whether a file is there (for the ledger's message about a missing pinned file)."""
        if not self.remote:
            return (Path(self.base) / relpath).exists()
        return bool(self._call(self.fs.exists, f"{self.root}/{relpath}"))

    def _remote_file(self, fs_path: str, rel: str, info: dict[str, Any]) -> SourceFile:
        etag = info.get("ETag") or info.get("etag") or ""
        mtime = (
            info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("created")
        )
        url = join_location(self.base, rel) if self.is_dir() else str(self.location)
        return SourceFile(rel, url, f"{info.get('size')}:{etag}:{mtime}", fs_path)

    # -- reading ---------------------------------------------------------------------------------

    @contextmanager
    def open(self, file: SourceFile) -> Iterator[BinaryIO]:
        """The file's bytes as an unbuffered binary stream."""
        if not self.remote:
            with open(file.location, "rb", buffering=0) as handle:
                yield handle
            return
        try:
            handle = self.fs.open(file.fs_path, "rb")
        except Exception as exc:  # noqa: BLE001
            raise OSError(self.describe(exc)) from None
        with handle:
            yield handle

    def read_bytes(self, file: SourceFile) -> bytes:
        if not self.remote:
            return Path(file.location).read_bytes()
        try:
            return self.fs.cat_file(file.fs_path)
        except Exception as exc:  # noqa: BLE001
            raise OSError(self.describe(exc)) from None

    def describe(self, exc: BaseException) -> str:
        """`Type: message` of an error, with any resolved secret replaced by ***."""
        message = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{self.label}: cannot list {self.location}: {self.describe(exc)}") from None


def _local_file(path: Path, rel: str) -> SourceFile:
    stat = path.stat()
    # the file is opened by its real path; its name is recorded (ids, rejects, provenance) printable
    return SourceFile(printable(rel), path, f"{stat.st_size}:{stat.st_mtime_ns}")


def matching_files(root: Path, patterns: list[str]) -> list[Path]:
    """Files under `root` matching any pattern at any depth, without hidden ones, sorted by relative path."""
    found: set[Path] = set()
    for pattern in patterns:
        for path in root.rglob(pattern):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                found.add(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def display(location: Path | str) -> str:
    return absolute_location(location)
