"""What flows through the data stage: documents, and rejects for input that could not become one.

A `Document` is one training text with where it came from. A `Reject` is a record a source could not
turn into a document (bad bytes, bad JSON, a missing field): it is written to `rejects.jsonl` with its
reason and location, and reading goes on.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Literal

Kind = Literal["code", "prose"]

# Why a source could not read a record (the `reason` of a Reject).
INVALID_UTF8 = "invalid-utf8"
INVALID_UNICODE = "invalid-unicode"  # decodes, but holds lone surrogates that no UTF-8 file can store
INVALID_JSON = "invalid-json"
NOT_AN_OBJECT = "not-an-object"
MISSING_FIELD = "missing-field"
FIELD_NOT_STRING = "field-not-string"
UNREADABLE_FILE = "unreadable-file"  # e.g. a truncated .gz: the rest of that file is lost, not the run
BINARY_FILE = "binary-file"  # NUL bytes or mostly undecodable: not text at all (vs. invalid-utf8)
RECORD_TOO_LARGE = "record-too-large"  # a line/record over the source's max_record_bytes, skipped unread
FILE_TOO_LARGE = "file-too-large"  # a file that must be parsed whole (JSON, a book) over its size cap
NO_MAIN_TEXT = "no-main-text"  # an HTML page (file or WARC record) without extractable main text
INVALID_CONVERSATION = "invalid-conversation"  # no messages list, or a turn without role/content
UNKNOWN_ROLE = "unknown-role"  # a turn whose role the conversation source does not allow

EXCERPT_CHARS = 120


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str
    kind: Kind
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    # The FileRecord (lmloom.data.provenance) of the file it was read from, for per-file counts;
    # not part of the document's identity or its JSON.
    origin: Any = field(default=None, compare=False, repr=False)

    def with_text(self, text: str) -> Document:
        return self if text == self.text else replace(self, text=text)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "kind": self.kind, "source": self.source, "meta": self.meta}


@dataclass(frozen=True, slots=True)
class Reject:
    source: str
    location: str  # "path:line", or "path" when the whole file is rejected
    reason: str
    excerpt: str = ""
    detail: str = ""  # the parser's own words, e.g. "Expecting ',' delimiter: line 1 column 9"
    origin: Any = field(default=None, compare=False, repr=False)  # the FileRecord, as for Document

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "location": self.location,
            "reason": self.reason,
            "excerpt": self.excerpt,
            "detail": self.detail,
        }


def excerpt(raw: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """A short one-line view of bad input; undecodable bytes show as \\xNN escapes."""
    text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else raw
    text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")  # lone surrogates
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def decode_error_line(data: bytes, exc: UnicodeDecodeError) -> int:
    """1-based line of the first undecodable byte, so a reject can point at it."""
    return data.count(b"\n", 0, exc.start) + 1


class JsonlWriter:
    """Writes one JSON object per line (UTF-8, no ASCII escaping) and counts the records."""

    def __init__(self, handle: BinaryIO):
        """`handle`: a binary writer such as `ArtifactWriter.open(name)`; closed by `close()`."""
        self.records = 0
        self._handle = io.TextIOWrapper(handle, encoding="utf-8", newline="\n")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.records += 1

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
