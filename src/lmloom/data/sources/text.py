"""`text-dir`: one document per file under a directory (local or a URL), by glob patterns.

Plain text and Markdown are taken as they are; HTML (`*.html`, `*.htm`, `*.xhtml`) becomes its main
text (lmloom.data.html), and a page without any is rejected as `no-main-text`. Files that are not
text at all (a NUL byte, or mostly undecodable) are rejected as `binary-file`; text with a few bad
bytes as `invalid-utf8`, pointing at the line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field

from lmloom.data.documents import (
    BINARY_FILE,
    INVALID_UTF8,
    NO_MAIN_TEXT,
    Document,
    Kind,
    Reject,
    decode_error_line,
    excerpt,
)
from lmloom.data.html import extract_main_text
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources.reading import FileSource, list_files, read_whole, reject_unreadable
from lmloom.data.sources.storage import GlobPatterns

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_SNIFF_BYTES = 8192
_BINARY_SHARE = 0.3  # more undecodable bytes than this in the first 8 KiB: not text with a typo


class TextDirSource(FileSource):
    """One document per file under `path` whose name matches a pattern (recursive; hidden files skipped)."""

    type: Literal["text-dir"] = "text-dir"
    patterns: GlobPatterns = Field(default_factory=lambda: ["*.txt", "*.md"], min_length=1)
    kind: Kind = "prose"

    def file_patterns(self) -> list[str]:
        return self.patterns


def read_text_dir(
    cfg: TextDirSource, notes: dict[str, Any], ledger: SourceLedger
) -> Iterator[Document | Reject]:
    store = cfg.store()
    files = list_files(cfg, store, ledger, single_file=False, allow_empty=True)
    notes["files"] = len(files)
    for file in files:
        data, origin, problem = read_whole(store, file, ledger)  # refuses a pinned file with other bytes
        if data is None:
            yield reject_unreadable(cfg.label, str(file), problem or "unreadable", origin)
            continue
        text, reject = decode_text(data, str(file), cfg.label, origin)
        if reject is not None:
            yield reject
            continue
        meta: dict[str, Any] = {"path": file.relpath}
        if file.relpath.lower().endswith(HTML_SUFFIXES):
            main = extract_main_text(text or "", url=str(file))
            if main is None:
                yield Reject(
                    cfg.label,
                    str(file),
                    NO_MAIN_TEXT,
                    excerpt(text or ""),
                    "no main text found",
                    origin=origin,
                )
                continue
            text, meta["format"] = main, "html"
        elif PurePosixPath(file.relpath).suffix.lower() in (".md", ".markdown"):
            meta["format"] = "markdown"
        yield Document(file.relpath, text or "", cfg.kind, cfg.label, meta, origin=origin)
    ledger.finish()


def decode_text(data: bytes, where: str, label: str, origin: Any) -> tuple[str | None, Reject | None]:
    """The file's text (a UTF-8 BOM dropped), or a `binary-file` / `invalid-utf8` reject."""
    if looks_binary(data):
        return None, Reject(label, where, BINARY_FILE, excerpt(data[:60]), "not a text file", origin=origin)
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        at = f"{where}:{decode_error_line(data, exc)}"
        bad = excerpt(data[max(0, exc.start - 40) : exc.end + 40])
        return None, Reject(label, at, INVALID_UTF8, bad, str(exc), origin=origin)


def looks_binary(data: bytes) -> bool:
    """A NUL byte, or a head that is mostly not UTF-8: an image, an archive, a compiled file."""
    head = data[:_SNIFF_BYTES]
    if b"\0" in head:
        return True
    decoded = head.decode("utf-8", errors="replace")
    # a multi-byte character cut at the sniff boundary is not a sign of binary data
    bad = decoded.count("\ufffd") - (1 if len(data) > _SNIFF_BYTES and decoded.endswith("\ufffd") else 0)
    return bool(head) and bad / len(head) > _BINARY_SHARE
