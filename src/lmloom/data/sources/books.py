r"""`books`: long texts, one document per book or per chapter.

Plain-text books (`*.txt` by default) are read whole; with `chapter_pattern` (a regex matched per
line, e.g. `^(CHAPTER|Chapter) [IVXLC\d]+`) they are split at each matching line. EPUBs are read
with ebooklib: each document in the spine is a chapter, its text via lmloom.data.html. Any document
longer than `max_chars` is cut at paragraph breaks into parts of at most that many characters, so
one book never becomes a single unbounded document. Meta: title and author (EPUB metadata, or for a
text file a `Title:` / `Author:` line near the top, as Project Gutenberg writes them), chapter, part.

An EPUB is a zip (read from its end), so it is hashed and then parsed through the same handle (a
remote one is spooled to a temporary file); the whole file is recorded in the ledger.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, field_validator

from lmloom.data.documents import FILE_TOO_LARGE, Document, Reject
from lmloom.data.html import extract_main_text
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources.reading import FileSource, list_files, read_seekable, read_whole, reject_unreadable
from lmloom.data.sources.storage import GlobPatterns, SourceFile, Store
from lmloom.data.sources.text import decode_text

_HEADER_LINES = 60
_TITLE = re.compile(r"^\s*Title:\s*(.+?)\s*$", re.M)
_AUTHOR = re.compile(r"^\s*Author:\s*(.+?)\s*$", re.M)


class BooksSource(FileSource):
    """Books as plain text or EPUB, one document per book, chapter, or max_chars part."""

    type: Literal["books"] = "books"
    patterns: GlobPatterns = Field(default_factory=lambda: ["*.txt", "*.epub"], min_length=1)
    chapter_pattern: str | None = Field(None, description="regex of a chapter heading line in text books")
    max_chars: int = Field(200_000, gt=0, description="longer books/chapters are cut at paragraph breaks")
    max_file_bytes: int = Field(256 << 20, gt=0, description="larger files are rejected unread")

    def file_patterns(self) -> list[str]:
        return self.patterns

    @field_validator("chapter_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        # compiled only when the books are read: a typo must be a config error before anything runs
        if pattern is not None:
            try:
                re.compile(pattern, re.M)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern


def read_books(cfg: BooksSource, notes: dict[str, Any], ledger: SourceLedger) -> Iterator[Document | Reject]:
    heading = re.compile(cfg.chapter_pattern, re.M) if cfg.chapter_pattern else None
    store = cfg.store()
    files = list_files(cfg, store, ledger)
    notes["files"] = len(files)
    for file in files:
        size = file.stamp.split(":", 1)[0]
        if size.isdigit() and int(size) > cfg.max_file_bytes:
            origin = ledger.start(file.location, file.relpath)
            ledger.finish_file(origin, None, None, "over max_file_bytes, not read")
            detail = f"{int(size):,} bytes, over max_file_bytes={cfg.max_file_bytes:,}"
            yield Reject(cfg.label, str(file), FILE_TOO_LARGE, "", detail, origin=origin)
            continue
        if file.relpath.lower().endswith(".epub"):
            yield from _read_epub(cfg, store, file, ledger)
        else:
            yield from _read_text_book(cfg, store, file, ledger, heading)
    ledger.finish()


def _read_text_book(
    cfg: BooksSource, store: Store, file: SourceFile, ledger: SourceLedger, heading: re.Pattern[str] | None
) -> Iterator[Document | Reject]:
    data, origin, problem = read_whole(store, file, ledger)
    if data is None:
        yield reject_unreadable(cfg.label, str(file), problem or "unreadable", origin)
        return
    text, reject = decode_text(data, str(file), cfg.label, origin)
    if reject is not None:
        yield reject
        return
    text = text or ""
    head = "\n".join(text.splitlines()[:_HEADER_LINES])
    meta: dict[str, Any] = {"path": file.relpath}
    for key, pattern in (("title", _TITLE), ("author", _AUTHOR)):
        if match := pattern.search(head):
            meta[key] = match.group(1)
    chapters = split_chapters(text, heading) if heading else [(None, text)]
    yield from _documents(cfg, file.relpath, chapters, meta, origin)


def _read_epub(
    cfg: BooksSource, store: Store, file: SourceFile, ledger: SourceLedger
) -> Iterator[Document | Reject]:
    import ebooklib
    from ebooklib import epub

    with read_seekable(store, file, ledger) as (handle, origin, problem):
        if handle is None:
            yield reject_unreadable(cfg.label, str(file), problem or "unreadable", origin)
            return
        try:
            book = epub.read_epub(handle, options={"ignore_ncx": True})
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, epub.EpubException) as exc:
            yield reject_unreadable(cfg.label, str(file), f"{type(exc).__name__}: {exc}", origin)
            return
        meta: dict[str, Any] = {"path": file.relpath}
        for key, name in (("title", "title"), ("author", "creator")):
            values = book.get_metadata("DC", name)
            if values and values[0] and values[0][0]:
                meta[key] = str(values[0][0])
        chapters = []
        for item_id, _linear in book.spine:
            item = book.get_item_with_id(item_id)
            if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
                continue
            html = item.get_content().decode("utf-8", errors="replace")
            text = extract_main_text(html)
            if text:
                chapters.append((item.get_name(), text))
    yield from _documents(cfg, file.relpath, chapters, meta, origin, "chapter_file")


def split_chapters(text: str, heading: re.Pattern[str]) -> list[tuple[str | None, str]]:
    """(heading, text) of each chapter; text before the first heading is a chapter of its own."""
    starts = [m.start() for m in heading.finditer(text)]
    if not starts:
        return [(None, text)]
    chapters: list[tuple[str | None, str]] = []
    if text[: starts[0]].strip():
        chapters.append((None, text[: starts[0]]))
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        body = text[begin:end]
        chapters.append((body.split("\n", 1)[0].strip(), body))
    return chapters


def cut(text: str, max_chars: int) -> list[str]:
    """Parts of at most max_chars, cut at the last paragraph break (else line break, else anywhere)."""
    parts = []
    while len(text) > max_chars:
        window = text[:max_chars]
        at = window.rfind("\n\n")
        if at <= 0:
            at = window.rfind("\n")
        if at <= 0:
            at = max_chars
        parts.append(text[:at])
        text = text[at:].lstrip("\n")
    parts.append(text)
    return [p for p in parts if p.strip()]


def _documents(
    cfg: BooksSource,
    name: str,
    chapters: list[tuple[str | None, str]],
    meta: dict[str, Any],
    origin: Any,
    title_key: str = "chapter_title",  # an EPUB chapter is named by its file inside the book
) -> Iterator[Document]:
    for number, (title, body) in enumerate(chapters):
        parts = cut(body, cfg.max_chars)
        for part_no, part in enumerate(parts):
            doc_meta = dict(meta)
            doc_id = name
            if len(chapters) > 1:
                doc_meta["chapter"] = number
                doc_id += f"#ch{number}"
                if title:
                    doc_meta[title_key] = title
            if len(parts) > 1:
                doc_meta["part"] = part_no
                doc_id += f"#p{part_no}"
            yield Document(doc_id, part, "prose", cfg.label, doc_meta, origin)
