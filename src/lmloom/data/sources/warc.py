"""`warc`: web crawls (.warc, .warc.gz), one document per HTML response: its main text.

Each `response` record whose HTTP Content-Type is HTML becomes the page's main text (lmloom.data.html),
with meta url, date (WARC-Date), content_type and status. What is not a web page is not an error, so
it is only counted in the source's notes (`skipped`: non-response records, non-HTML responses, non-200
statuses); an HTML page without main text is rejected as `no-main-text` (with its URL), and a page over
`max_record_bytes` as `record-too-large`, so both stay visible in rejects.jsonl. A damaged archive
keeps the pages before the damage and rejects the rest of the file as `unreadable-file`.
"""

from __future__ import annotations

import codecs
from collections import Counter
from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from pydantic import Field

from lmloom.data.documents import NO_MAIN_TEXT, RECORD_TOO_LARGE, Document, Kind, Reject
from lmloom.data.html import extract_main_text
from lmloom.data.provenance import FileRecord, SourceLedger
from lmloom.data.sources.reading import Cursor, FileSource, list_files, read_stream
from lmloom.data.sources.storage import GlobPatterns

HTML_TYPES = ("text/html", "application/xhtml+xml")


class WarcSource(FileSource):
    """The main text of every HTML response in .warc / .warc.gz files (a file or a directory)."""

    type: Literal["warc"] = "warc"
    kind: Kind = "prose"
    max_record_bytes: int = Field(8 << 20, gt=0, description="larger pages are rejected unread")
    patterns: GlobPatterns = Field(default_factory=lambda: ["*.warc", "*.warc.gz"], min_length=1)

    def file_patterns(self) -> list[str]:
        return self.patterns


def read_warc(cfg: WarcSource, notes: dict[str, Any], ledger: SourceLedger) -> Iterator[Document | Reject]:
    store = cfg.store()
    files = list_files(cfg, store, ledger)
    notes["files"] = len(files)
    skipped: Counter[str] = Counter()
    for file in files:

        def parse(
            stream: BinaryIO, origin: FileRecord, cursor: Cursor, file: Any = file
        ) -> Iterator[Document | Reject]:
            return _pages(stream, str(file), file.relpath, cfg, origin, cursor, skipped)

        # warcio undoes the per-record gzip of a .warc.gz itself
        yield from read_stream(cfg.label, store, file, ledger, parse, decompress=False)
    notes["skipped"] = dict(sorted(skipped.items()))
    ledger.finish()


def _pages(
    stream: BinaryIO,
    path: str,
    name: str,
    cfg: WarcSource,
    origin: FileRecord,
    cursor: Cursor,
    skipped: Counter[str],
) -> Iterator[Document | Reject]:
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    records = ArchiveIterator(stream)
    try:
        for record in _parsed(records):
            if record.rec_type != "response":
                skipped[f"{record.rec_type}-record"] += 1
                continue
            headers = record.rec_headers
            url = headers.get_header("WARC-Target-URI") or ""
            http = record.http_headers
            content_type = (http.get_header("Content-Type") if http else None) or ""
            if http is None or content_type.split(";")[0].strip().lower() not in HTML_TYPES:
                skipped["not-html"] += 1
                continue
            status = http.get_statuscode()
            if status != "200":
                skipped[f"status-{status}"] += 1
                continue
            body = _read_up_to(record.content_stream(), cfg.max_record_bytes + 1)
            # only once the body is read: asking warcio for the offset earlier loses the body
            offset = records.get_record_offset()
            where = f"{path}@{offset}"
            cursor.where = where
            if len(body) > cfg.max_record_bytes:
                detail = f"over max_record_bytes={cfg.max_record_bytes:,}; skipped unread"
                yield Reject(cfg.label, where, RECORD_TOO_LARGE, url, detail, origin=origin)
                continue
            text = extract_main_text(body.decode(_charset(content_type), errors="replace"), url=url or None)
            if text is None:
                yield Reject(
                    cfg.label, where, NO_MAIN_TEXT, url, "no main text found in the page", origin=origin
                )
                continue
            doc_id = headers.get_header("WARC-Record-ID") or f"{name}@{offset}"
            meta = {
                "url": url,
                "date": headers.get_header("WARC-Date"),
                "content_type": content_type,
                "file": name,
                "offset": offset,
            }
            yield Document(doc_id, text, cfg.kind, cfg.label, meta, origin)
    except ArchiveLoadFailed as exc:  # not a WARC, or a damaged record header
        raise ValueError(str(exc)) from None


def _parsed(records: Any) -> Iterator[Any]:
    """warcio's records; a record header its parser trips over (e.g. a response without a
    WARC-Target-URI raises AttributeError inside warcio) is a damaged file, not a crash."""
    iterator = iter(records)
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"malformed WARC record ({type(exc).__name__}: {exc})") from None
        yield record


def _read_up_to(stream: Any, limit: int) -> bytes:
    """Up to `limit` bytes (warcio's read returns short reads)."""
    parts, size = [], 0
    while size < limit:
        chunk = stream.read(min(1 << 20, limit - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _charset(content_type: str) -> str:
    """The charset a Content-Type names, if Python knows it; UTF-8 otherwise."""
    for part in content_type.split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset":
            try:
                return codecs.lookup(value.strip().strip('"')).name
            except LookupError:
                break
    return "utf-8"
