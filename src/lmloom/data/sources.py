"""Where documents come from. Each source is a typed config plus a reader that yields documents and,
for input it cannot use, rejects with a reason and a `path:line`; a bad record never stops the reading.

    python-stdlib   the running Python's standard library and docs (lmloom.data.stdlib_corpus)
    text-dir        every file under a directory matching glob patterns, one document per file
    jsonl           JSON Lines (.jsonl or .jsonl.gz, or a directory of them), text in a chosen field
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from lmloom.config import StrictConfig
from lmloom.data.documents import (
    FIELD_NOT_STRING,
    INVALID_JSON,
    INVALID_UNICODE,
    INVALID_UTF8,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    UNREADABLE_FILE,
    Document,
    Kind,
    Reject,
    decode_error_line,
    excerpt,
)
from lmloom.data.stdlib_corpus import StdlibSource, list_stdlib_files, read_stdlib
from lmloom.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


# Recorded absolute, so the manifest says exactly what was read and the stage key does not depend on
# the directory the recipe was run from.
AbsolutePath = Annotated[Path, AfterValidator(lambda path: path.expanduser().resolve())]


class TextDirSource(StrictConfig):
    """One document per file under `path` whose name matches a pattern (recursive; hidden files skipped)."""

    type: Literal["text-dir"] = "text-dir"
    path: AbsolutePath
    patterns: list[str] = Field(default_factory=lambda: ["*.txt", "*.md"], min_length=1)
    kind: Kind = "prose"
    name: str | None = None  # defaults to "text-dir:<path>"

    @property
    def label(self) -> str:
        return self.name or f"text-dir:{self.path}"


class JsonlSource(StrictConfig):
    """One document per JSON object line; `path` is a .jsonl/.jsonl.gz file or a directory of them."""

    type: Literal["jsonl"] = "jsonl"
    path: AbsolutePath
    text_field: str = "text"
    id_field: str | None = None  # without it (or where a record lacks it) the id is "<file>:<line>"
    kind: Kind = "prose"
    name: str | None = None  # defaults to "jsonl:<path>"

    @property
    def label(self) -> str:
        return self.name or f"jsonl:{self.path}"


SourceConfig = Annotated[StdlibSource | TextDirSource | JsonlSource, Field(discriminator="type")]


def read_source(cfg: SourceConfig, notes: dict[str, Any] | None = None) -> Iterator[Document | Reject]:
    """Documents and rejects of one source; `notes` collects source-specific facts for the manifest."""
    reader: Callable[..., Iterator[Document | Reject]] = _READERS[cfg.type]
    return reader(cfg, {} if notes is None else notes)


# -- text-dir ------------------------------------------------------------------------------------


def read_text_dir(cfg: TextDirSource, notes: dict[str, Any]) -> Iterator[Document | Reject]:
    root = cfg.path
    if not root.exists():
        raise DataError(f"{cfg.label}: directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{cfg.label}: {root} is not a directory")
    files = matching_files(root, cfg.patterns)
    notes["files"] = len(files)
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield Reject(cfg.label, str(path), UNREADABLE_FILE, detail=f"{type(exc).__name__}: {exc}")
            continue
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            where = f"{path}:{decode_error_line(data, exc)}"
            bad = excerpt(data[max(0, exc.start - 40) : exc.end + 40])
            yield Reject(cfg.label, where, INVALID_UTF8, bad, str(exc))
            continue
        yield Document(rel, text, cfg.kind, cfg.label, {"path": rel})


def matching_files(root: Path, patterns: list[str]) -> list[Path]:
    """Files under `root` matching any pattern at any depth, without hidden ones, sorted by relative path."""
    found: set[Path] = set()
    for pattern in patterns:
        for path in root.rglob(pattern):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                found.add(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# -- jsonl ---------------------------------------------------------------------------------------


def read_jsonl(cfg: JsonlSource, notes: dict[str, Any]) -> Iterator[Document | Reject]:
    root = cfg.path
    if not root.exists():
        raise DataError(f"{cfg.label}: file {root} does not exist")
    files = jsonl_files(root)
    if not files:
        raise DataError(f"{cfg.label}: directory {root} holds no {' or '.join(JSONL_SUFFIXES)} files")
    notes["files"] = len(files)
    for path in files:
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        yield from _read_jsonl_file(path, name, cfg)


def jsonl_files(root: Path) -> list[Path]:
    return matching_files(root, [f"*{suffix}" for suffix in JSONL_SUFFIXES]) if root.is_dir() else [root]


def _read_jsonl_file(path: Path, name: str, cfg: JsonlSource) -> Iterator[Document | Reject]:
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):  # noqa: B007 (the except clause reports it)
                record = _parse_line(raw, path, name, lineno, cfg)
                if record is not None:
                    yield record
    except (OSError, EOFError, zlib.error) as exc:  # unreadable or truncated (.gz) file: keep what was read
        yield Reject(
            cfg.label, f"{path}:{lineno + 1}", UNREADABLE_FILE, detail=f"{type(exc).__name__}: {exc}"
        )


def _parse_line(raw: bytes, path: Path, name: str, lineno: int, cfg: JsonlSource) -> Document | Reject | None:
    where = f"{path}:{lineno}"
    line = raw.rstrip(b"\r\n")
    if not line.strip():
        return None  # blank lines are tolerated, as most JSONL writers and readers do
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(cfg.label, where, INVALID_UTF8, excerpt(line), str(exc))
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Reject(cfg.label, where, INVALID_JSON, excerpt(text), getattr(exc, "msg", str(exc)))
    if not isinstance(record, dict):
        return Reject(cfg.label, where, NOT_AN_OBJECT, excerpt(text), f"a JSON {type(record).__name__}")
    if cfg.text_field not in record:
        return Reject(cfg.label, where, MISSING_FIELD, excerpt(text), f"no field {cfg.text_field!r}")
    value = record[cfg.text_field]
    if not isinstance(value, str):
        detail = f"field {cfg.text_field!r} is a {type(value).__name__}, not a string"
        return Reject(cfg.label, where, FIELD_NOT_STRING, excerpt(text), detail)
    if not _encodable(value):
        return Reject(cfg.label, where, INVALID_UNICODE, excerpt(text), "text holds lone surrogate escapes")
    doc_id = record.get(cfg.id_field) if cfg.id_field else None
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or not _encodable(str(doc_id)):
        doc_id = f"{name}:{lineno}"
    return Document(str(doc_id), value, cfg.kind, cfg.label, {"file": name, "line": lineno})


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- fingerprints ------------------------------------------------------------------------------


def source_fingerprint(cfg: SourceConfig) -> str:
    """A cheap digest of what a source would read now: each file's path, size and mtime.

    The pipeline mixes it into the stage key (Stage.fingerprint), so an edited file under an
    unchanged config makes a new corpus instead of reusing a stale one.
    """
    if isinstance(cfg, StdlibSource):
        root, header = cfg.root, f"{cfg.root}\0{sys.version}"
        files = [root / rel for rel, _ in list_stdlib_files(root, cfg.include_tests)] if root.is_dir() else []
    elif isinstance(cfg, TextDirSource):
        header = str(cfg.path)
        files = matching_files(cfg.path, cfg.patterns) if cfg.path.is_dir() else []
    else:
        header = str(cfg.path)
        files = jsonl_files(cfg.path) if cfg.path.exists() else []
    digest = hashlib.sha256(f"{cfg.type}\0{header}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


_READERS: dict[str, Callable[..., Iterator[Document | Reject]]] = {
    "python-stdlib": read_stdlib,
    "text-dir": read_text_dir,
    "jsonl": read_jsonl,
}
