"""`jsonl` and `json`: one document per JSON object, text in a chosen (dotted) field.

    jsonl   JSON Lines: .jsonl, .jsonl.gz, .jsonl.zst (or a directory of them), streamed line by line
    json    a JSON document: an array of objects, or an object holding the array under `records_key`
            (.json, .json.gz, .json.zst); parsed whole, so capped by `max_file_bytes`

A line longer than `max_record_bytes` is rejected as `record-too-large` without ever being held in
memory: it is read in bounded chunks and skipped up to the next newline. A truncated .gz/.zst keeps
the records before the break and rejects the rest of the file as `unreadable-file`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from pydantic import Field

from lmloom.data.documents import (
    FIELD_NOT_STRING,
    FILE_TOO_LARGE,
    INVALID_JSON,
    INVALID_UNICODE,
    INVALID_UTF8,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    RECORD_TOO_LARGE,
    Document,
    Kind,
    Reject,
    excerpt,
)
from lmloom.data.provenance import FileRecord, Sha256Hex, SourceLedger
from lmloom.data.sources.reading import Cursor, FileSource, list_files, read_stream
from lmloom.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
JSON_SUFFIXES = (".json", ".json.gz", ".json.zst")
DEFAULT_MAX_RECORD_BYTES = 16 << 20
_SKIP_CHUNK = 1 << 20  # how much of an over-long line is read at a time while skipping it


class _RecordSource(FileSource):
    text_field: str = Field(
        "text", description="field holding the text; a dotted path reaches nested objects"
    )
    id_field: str | None = None  # without it (or where a record lacks it) the id is "<file>:<line>"
    kind: Kind = "prose"
    sha256: Sha256Hex | None = Field(
        None,
        description=(
            "pin a single-file source by the sha256 of its bytes (as stored, e.g. compressed): a "
            "changed or missing file is refused before anything is published; shorthand for "
            "pins: {<file name>: <sha256>}"
        ),
    )

    def pinned_files(self) -> dict[str, str]:
        pins = dict(self.pins)
        if self.sha256:
            pins[str(self.path).rstrip("/").rsplit("/", 1)[-1]] = self.sha256
        return pins


class JsonlSource(_RecordSource):
    """One document per JSON object line; `path` is a .jsonl(.gz/.zst) file or a directory of them."""

    type: Literal["jsonl"] = "jsonl"
    max_record_bytes: int = Field(
        DEFAULT_MAX_RECORD_BYTES, gt=0, description="longer lines are rejected unread"
    )

    def file_patterns(self) -> list[str]:
        return [f"*{suffix}" for suffix in JSONL_SUFFIXES]


class JsonSource(_RecordSource):
    """One document per object of a JSON array (the whole file, or the list under `records_key`)."""

    type: Literal["json"] = "json"
    records_key: str | None = Field(None, description="dotted path of the list in a top-level object")
    max_file_bytes: int = Field(
        256 << 20, gt=0, description="a JSON file is parsed whole: larger ones are rejected"
    )

    def file_patterns(self) -> list[str]:
        return [f"*{suffix}" for suffix in JSON_SUFFIXES]


def read_jsonl(cfg: JsonlSource, notes: dict[str, Any], ledger: SourceLedger) -> Iterator[Document | Reject]:
    yield from _read_files(cfg, notes, ledger, _parse_lines)


def read_json(cfg: JsonSource, notes: dict[str, Any], ledger: SourceLedger) -> Iterator[Document | Reject]:
    yield from _read_files(cfg, notes, ledger, _parse_array)


def _read_files(
    cfg: _RecordSource, notes: dict[str, Any], ledger: SourceLedger, parse: Any
) -> Iterator[Document | Reject]:
    store = cfg.store()
    if cfg.sha256 and store.exists() and store.is_dir():
        raise ConfigError(
            f"{cfg.label}: sha256 pins a single file, but {cfg.path} is a directory; pin its files with "
            f"pins: {{relative/path: sha256}} or all of them with digest"
        )
    files = list_files(cfg, store, ledger)
    notes["files"] = len(files)
    for file in files:

        def parse_file(
            stream: BinaryIO, origin: FileRecord, cursor: Cursor, file: Any = file
        ) -> Iterator[Document | Reject]:
            return parse(stream, str(file), file.relpath, cfg, origin, cursor)

        yield from read_stream(cfg.label, store, file, ledger, parse_file)
    ledger.finish()


# -- jsonl ---------------------------------------------------------------------------------------


def bounded_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line, size) of each line; an over-long line is yielded as None with the size it
    had, after being skipped in bounded chunks (never more than max_bytes + 1 MiB in memory)."""
    lineno = 0
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        if line.endswith(b"\n") or len(line) <= max_bytes:  # whole, and at most max_bytes of content
            yield lineno, line, len(line)
            continue
        size = len(line)
        del line
        while True:
            rest = stream.readline(_SKIP_CHUNK)
            size += len(rest)
            if not rest or rest.endswith(b"\n"):
                break
        yield lineno, None, size


def _parse_lines(
    stream: BinaryIO, path: str, name: str, cfg: JsonlSource, origin: FileRecord, cursor: Cursor
) -> Iterator[Document | Reject]:
    for lineno, line, size in bounded_lines(stream, cfg.max_record_bytes):
        where = f"{path}:{lineno}"
        cursor.where = f"{path}:{lineno + 1}"  # a decompression error after this line is "past" it
        if line is None:
            detail = f"{size:,} bytes, over max_record_bytes={cfg.max_record_bytes:,}; skipped unread"
            yield Reject(cfg.label, where, RECORD_TOO_LARGE, "", detail, origin=origin)
            continue
        record = parse_line(line, where, f"{name}:{lineno}", {"file": name, "line": lineno}, cfg, origin)
        if record is not None:
            yield record


def parse_line(
    raw: bytes, where: str, default_id: str, meta: dict[str, Any], cfg: _RecordSource, origin: Any = None
) -> Document | Reject | None:
    """A document from one JSON line, a reject saying why not, or None for a blank line."""
    if not raw.strip():
        return None  # blank lines are tolerated, as most JSONL writers and readers do
    parsed = json_line(raw, where, cfg.label, origin)
    if isinstance(parsed, Reject):
        return parsed
    record, text = parsed
    return record_document(record, text, where, default_id, meta, cfg, origin)


def json_line(raw: bytes, where: str, label: str, origin: Any) -> tuple[Any, str] | Reject:
    """(the parsed value, its text) of one JSON line, or a reject for bad UTF-8 or bad JSON."""
    line = raw.rstrip(b"\r\n")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(label, where, INVALID_UTF8, excerpt(line), str(exc), origin=origin)
    try:
        return json.loads(text), text
    except (ValueError, RecursionError) as exc:
        return Reject(label, where, INVALID_JSON, excerpt(text), getattr(exc, "msg", str(exc)), origin=origin)


def record_document(
    record: Any, raw: str, where: str, default_id: str, meta: dict[str, Any], cfg: _RecordSource, origin: Any
) -> Document | Reject:
    """A document from one parsed record, or a reject saying what is wrong with it."""
    if not isinstance(record, dict):
        return Reject(
            cfg.label, where, NOT_AN_OBJECT, excerpt(raw), f"a JSON {type(record).__name__}", origin=origin
        )
    found, value = dotted_get(record, cfg.text_field)
    if not found:
        return Reject(
            cfg.label, where, MISSING_FIELD, excerpt(raw), f"no field {cfg.text_field!r}", origin=origin
        )
    if not isinstance(value, str):
        detail = f"field {cfg.text_field!r} is a {type(value).__name__}, not a string"
        return Reject(cfg.label, where, FIELD_NOT_STRING, excerpt(raw), detail, origin=origin)
    if not encodable(value):
        return Reject(
            cfg.label,
            where,
            INVALID_UNICODE,
            excerpt(raw),
            "text holds lone surrogate escapes",
            origin=origin,
        )
    doc_id = dotted_get(record, cfg.id_field)[1] if cfg.id_field else None
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or not encodable(str(doc_id)):
        doc_id = default_id
    return Document(str(doc_id), value, cfg.kind, cfg.label, meta, origin)


def dotted_get(record: dict[str, Any], path: str) -> tuple[bool, Any]:
    """(found, value) of a field by name, or by a dotted path into nested objects ("meta.body")."""
    if path in record:
        return True, record[path]
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- json ----------------------------------------------------------------------------------------


def _parse_array(
    stream: BinaryIO, path: str, name: str, cfg: JsonSource, origin: FileRecord, cursor: Cursor
) -> Iterator[Document | Reject]:
    cursor.where = path
    data = stream.read(cfg.max_file_bytes + 1)
    if len(data) > cfg.max_file_bytes:
        detail = f"over max_file_bytes={cfg.max_file_bytes:,}; a json file is parsed whole (use jsonl)"
        yield Reject(cfg.label, path, FILE_TOO_LARGE, "", detail, origin=origin)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield Reject(
            cfg.label,
            path,
            INVALID_UTF8,
            excerpt(data[max(0, exc.start - 40) : exc.end + 40]),
            str(exc),
            origin=origin,
        )
        return
    del data
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as exc:
        yield Reject(
            cfg.label, path, INVALID_JSON, excerpt(text[:200]), getattr(exc, "msg", str(exc)), origin=origin
        )
        return
    records = parsed
    if cfg.records_key is not None:
        found, records = dotted_get(parsed, cfg.records_key) if isinstance(parsed, dict) else (False, None)
        if not found:
            yield Reject(
                cfg.label,
                path,
                MISSING_FIELD,
                excerpt(text[:200]),
                f"no list under {cfg.records_key!r}",
                origin=origin,
            )
            return
    if not isinstance(records, list):
        detail = f"a JSON {type(records).__name__}, not an array of objects" + (
            "" if cfg.records_key else " (set records_key for a list inside an object)"
        )
        yield Reject(cfg.label, path, NOT_AN_OBJECT, excerpt(text[:200]), detail, origin=origin)
        return
    for index, record in enumerate(records):
        raw = json.dumps(record, ensure_ascii=False)[:200]
        yield record_document(
            record, raw, f"{path}:[{index}]", f"{name}:{index}", {"file": name, "index": index}, cfg, origin
        )
