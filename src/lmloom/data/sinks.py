"""Where a corpus goes besides the artifact store: its JSONL files copied to any fsspec URL.

`export_corpus` copies train.jsonl and val.jsonl of a corpus artifact (their plaintext, also from an
encrypted artifact) to `<url>/train.jsonl` and `<url>/val.jsonl`, streaming, and returns what it
wrote with each file's sha256 and size, so the copy can be checked later. Credentials come from the
environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) or "${env:NAME}" references in storage_options,
as for sources; literal secrets are refused and resolved ones scrubbed from errors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from lmloom.data.sources.storage import StorageOptions, resolve_options
from lmloom.errors import ConfigError, DataError

CORPUS_FILES = ("train.jsonl", "val.jsonl")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExportedFile:
    name: str
    url: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "sha256": self.sha256, "size": self.size}


def export_corpus(
    corpus_artifact: Any, url: str, storage_options: dict[str, Any] | None = None
) -> list[ExportedFile]:
    """Copy the corpus's train/val JSONL to `url` (a local directory or an fsspec URL prefix)."""
    import fsspec

    options = _checked_options(storage_options or {})
    resolved, secrets = resolve_options(options, f"export to {url}")
    target = url.rstrip("/") or url
    try:
        fs, root = fsspec.core.url_to_fs(target, **resolved)
        fs.makedirs(root, exist_ok=True)
    except Exception as exc:  # noqa: BLE001 (fsspec backends raise anything; report it in one line)
        raise DataError(f"cannot export to {url}: {_scrub(exc, secrets)}") from None
    written = []
    for name in CORPUS_FILES:
        destination = f"{root.rstrip('/')}/{name}"
        digest, size = hashlib.sha256(), 0
        try:
            with corpus_artifact.open(name) as source, fs.open(destination, "wb") as sink:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    sink.write(chunk)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot export {name} to {url}: {_scrub(exc, secrets)}") from None
        shown = f"{target}/{name}" if "://" in target else str(Path(target).resolve() / name)
        written.append(ExportedFile(name, shown, digest.hexdigest(), size))
    return written


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    try:
        return TypeAdapter(StorageOptions).validate_python(options)
    except ValidationError as exc:
        raise ConfigError(f"storage_options: {exc.errors()[0]['msg']}") from None


def _scrub(exc: BaseException, secrets: list[str]) -> str:
    message = f"{type(exc).__name__}: {exc}"
    for secret in secrets:
        message = message.replace(secret, "***")
    return message
