"""Where documents come from. Each source is a typed config plus a reader that yields documents and,
for input it cannot use, rejects with a reason and a `path:line`; a bad record never stops the reading.

    python-stdlib   the running Python's standard library and docs (lmloom.data.stdlib_corpus)
    text-dir        every file under a directory matching glob patterns, one document per file
    jsonl           JSON Lines (.jsonl or .jsonl.gz, or a directory of them), text in a chosen field

Every reader records each file it reads, with the sha256 of the bytes it read, in a SourceLedger
(lmloom.data.provenance) that also enforces the source's pins (`pins`, `digest`, and for a single
jsonl file `sha256`); documents and rejects carry their file's record as `origin`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

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
from lmloom.data.provenance import Digest, HashingReader, Pins, Sha256Hex, SourceLedger
from lmloom.data.stdlib_corpus import StdlibSource, list_stdlib_files, read_stdlib
from lmloom.errors import ConfigError, DataError

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
    pins: Pins = {}
    digest: Digest = None

    @property
    def label(self) -> str:
        return self.name or f"text-dir:{self.path}"

    def pinned_files(self) -> dict[str, str]:
        return dict(self.pins)


class JsonlSource(StrictConfig):
    """One document per JSON object line; `path` is a .jsonl/.jsonl.gz file or a directory of them."""

    type: Literal["jsonl"] = "jsonl"
    path: AbsolutePath
    text_field: str = "text"
    id_field: str | None = None  # without it (or where a record lacks it) the id is "<file>:<line>"
    kind: Kind = "prose"
    name: str | None = None  # defaults to "jsonl:<path>"
    sha256: Sha256Hex | None = Field(
        None,
        description=(
            "pin a single-file source by the sha256 of its bytes (as stored, e.g. compressed): a "
            "changed or missing file is refused before anything is published; shorthand for "
            "pins: {<file name>: <sha256>}"
        ),
    )
    pins: Pins = {}
    digest: Digest = None

    @property
    def label(self) -> str:
        return self.name or f"jsonl:{self.path}"

    def pinned_files(self) -> dict[str, str]:
        pins = dict(self.pins)
        if self.sha256:
            pins[self.path.name] = self.sha256
        return pins


SourceConfig = Annotated[StdlibSource | TextDirSource | JsonlSource, Field(discriminator="type")]


def read_source(
    cfg: SourceConfig, notes: dict[str, Any] | None = None, ledger: SourceLedger | None = None
) -> Iterator[Document | Reject]:
    """Documents and rejects of one source; `notes` collects source-specific facts for the manifest,
    `ledger` the files read (with their sha256), and it refuses files that break the source's pins."""
    reader: Callable[..., Iterator[Document | Reject]] = _READERS[cfg.type]
    return reader(cfg, {} if notes is None else notes, ledger or SourceLedger.for_config(cfg))


# -- text-dir ------------------------------------------------------------------------------------


def read_text_dir(
    cfg: TextDirSource, notes: dict[str, Any], ledger: SourceLedger
) -> Iterator[Document | Reject]:
    root = cfg.path
    if not root.exists():
        raise DataError(f"{cfg.label}: directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{cfg.label}: {root} is not a directory")
    files = matching_files(root, cfg.patterns)
    ledger.expect(root, [path.relative_to(root).as_posix() for path in files])
    notes["files"] = len(files)
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as exc:
            origin = ledger.unreadable(path, rel, exc)
            detail = f"{type(exc).__name__}: {exc}"
            yield Reject(cfg.label, str(path), UNREADABLE_FILE, detail=detail, origin=origin)
            continue
        origin = ledger.read_bytes(path, rel, data)  # refuses a pinned file with other bytes
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            where = f"{path}:{decode_error_line(data, exc)}"
            bad = excerpt(data[max(0, exc.start - 40) : exc.end + 40])
            yield Reject(cfg.label, where, INVALID_UTF8, bad, str(exc), origin=origin)
            continue
        yield Document(rel, text, cfg.kind, cfg.label, {"path": rel}, origin=origin)
    ledger.finish()


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


def read_jsonl(cfg: JsonlSource, notes: dict[str, Any], ledger: SourceLedger) -> Iterator[Document | Reject]:
    root = cfg.path
    if cfg.sha256 and root.is_dir():
        raise ConfigError(
            f"{cfg.label}: sha256 pins a single file, but {root} is a directory; pin its files with "
            f"pins: {{relative/path: sha256}} or all of them with digest"
        )
    if not root.exists():
        if ledger.pins:  # a pinned input that is gone is an integrity failure, not just bad config
            ledger.expect(root.parent, [])
        raise DataError(f"{cfg.label}: file {root} does not exist")
    files = jsonl_files(root)
    if not files:
        raise DataError(f"{cfg.label}: directory {root} holds no {' or '.join(JSONL_SUFFIXES)} files")
    base = root if root.is_dir() else root.parent
    ledger.expect(base, [path.relative_to(base).as_posix() for path in files])
    notes["files"] = len(files)
    for path in files:
        name = path.relative_to(base).as_posix()
        yield from _read_jsonl_file(path, name, cfg, ledger)
    ledger.finish()


def jsonl_files(root: Path) -> list[Path]:
    return matching_files(root, [f"*{suffix}" for suffix in JSONL_SUFFIXES]) if root.is_dir() else [root]


def _read_jsonl_file(
    path: Path, name: str, cfg: JsonlSource, ledger: SourceLedger
) -> Iterator[Document | Reject]:
    origin = ledger.start(path, name)
    hashed: HashingReader | None = None
    problem: BaseException | None = None
    lineno = 0
    try:
        with open(path, "rb", buffering=0) as raw:
            hashed = HashingReader(raw)
            try:
                with _line_reader(hashed, gzipped=path.name.endswith(".gz")) as handle:
                    for lineno, line in enumerate(handle, 1):  # noqa: B007 (the except clause reports it)
                        record = _parse_line(line, path, name, lineno, cfg, origin)
                        if record is not None:
                            yield record
            except (OSError, EOFError, zlib.error) as exc:  # e.g. a truncated .gz: keep what was read
                problem = exc
            hashed.drain()  # the sha256 covers the whole file, also past a corrupt .gz stream
    except OSError as exc:  # the file itself cannot be opened or read
        problem = problem or exc
    if problem is not None:
        detail = f"{type(problem).__name__}: {problem}"
        yield Reject(cfg.label, f"{path}:{lineno + 1}", UNREADABLE_FILE, detail=detail, origin=origin)
    if hashed is not None and hashed.sha256 is not None:
        ledger.finish_file(origin, hashed.sha256, hashed.size)  # refuses a pinned file with other bytes
    else:
        ledger.finish_file(origin, None, None, f"{type(problem).__name__}: {problem}")


def _line_reader(raw: HashingReader, gzipped: bool) -> BinaryIO:
    buffered = io.BufferedReader(raw, 1 << 20)
    return gzip.GzipFile(fileobj=buffered, mode="rb") if gzipped else buffered


def _parse_line(
    raw: bytes, path: Path, name: str, lineno: int, cfg: JsonlSource, origin: Any = None
) -> Document | Reject | None:
    where = f"{path}:{lineno}"
    line = raw.rstrip(b"\r\n")
    if not line.strip():
        return None  # blank lines are tolerated, as most JSONL writers and readers do
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(cfg.label, where, INVALID_UTF8, excerpt(line), str(exc), origin=origin)
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Reject(
            cfg.label, where, INVALID_JSON, excerpt(text), getattr(exc, "msg", str(exc)), origin=origin
        )
    if not isinstance(record, dict):
        return Reject(
            cfg.label, where, NOT_AN_OBJECT, excerpt(text), f"a JSON {type(record).__name__}", origin=origin
        )
    if cfg.text_field not in record:
        return Reject(
            cfg.label, where, MISSING_FIELD, excerpt(text), f"no field {cfg.text_field!r}", origin=origin
        )
    value = record[cfg.text_field]
    if not isinstance(value, str):
        detail = f"field {cfg.text_field!r} is a {type(value).__name__}, not a string"
        return Reject(cfg.label, where, FIELD_NOT_STRING, excerpt(text), detail, origin=origin)
    if not _encodable(value):
        return Reject(
            cfg.label,
            where,
            INVALID_UNICODE,
            excerpt(text),
            "text holds lone surrogate escapes",
            origin=origin,
        )
    doc_id = record.get(cfg.id_field) if cfg.id_field else None
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or not _encodable(str(doc_id)):
        doc_id = f"{name}:{lineno}"
    return Document(str(doc_id), value, cfg.kind, cfg.label, {"file": name, "line": lineno}, origin)


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
