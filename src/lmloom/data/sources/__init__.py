"""Where documents come from. Each source is a typed config plus a reader that yields documents and,
for input it cannot use, rejects with a reason and a `path:line`; a bad record never stops the reading.

    python-stdlib   the running Python's standard library and docs (lmloom.data.stdlib_corpus)
    text-dir        text, Markdown and HTML files under a directory, one document per file (.text)
    jsonl           JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst, or a directory of them) (.jsonl)
    json            JSON arrays of objects, or a list inside an object (.jsonl)
    parquet         Parquet tables, streamed by record batch (.parquet)
    warc            web crawls (.warc, .warc.gz): the main text of each HTML response (.warc)
    code            a source tree or git checkout, language by extension (.code)
    conversations   chat transcripts in JSONL rendered with a chat template (.conversations)
    books           long texts and EPUBs, whole or split into chapters (.books)

Every path-based source reads a local path or any fsspec URL (s3://bucket/prefix, memory://...) with
`storage_options` (lmloom.data.sources.storage: secrets only as "${env:NAME}" references). Every
reader records each file it reads, with the sha256 of the bytes it read, in a SourceLedger
(lmloom.data.provenance) that also enforces the source's pins (`pins`, `digest`, and for a single
jsonl/json file `sha256`); documents and rejects carry their file's record as `origin`.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from pydantic import Field

from lmloom.data.documents import Document, Reject
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources.books import BooksSource, read_books
from lmloom.data.sources.code import CodeSource, read_code
from lmloom.data.sources.conversations import ConversationsSource, read_conversations
from lmloom.data.sources.jsonl import (
    JSON_SUFFIXES,
    JSONL_SUFFIXES,
    JsonlSource,
    JsonSource,
    read_json,
    read_jsonl,
)
from lmloom.data.sources.parquet import ParquetSource, read_parquet
from lmloom.data.sources.reading import FileSource, file_fingerprint_lines
from lmloom.data.sources.storage import AbsolutePath, Location, StorageOptions, Store, matching_files
from lmloom.data.sources.text import TextDirSource, read_text_dir
from lmloom.data.sources.warc import WarcSource, read_warc
from lmloom.data.stdlib_corpus import StdlibSource, list_stdlib_files, read_stdlib

__all__ = [
    "JSONL_SUFFIXES",
    "JSON_SUFFIXES",
    "AbsolutePath",
    "BooksSource",
    "CodeSource",
    "ConversationsSource",
    "FileSource",
    "JsonSource",
    "JsonlSource",
    "Location",
    "ParquetSource",
    "SourceConfig",
    "StdlibSource",
    "StorageOptions",
    "Store",
    "TextDirSource",
    "WarcSource",
    "matching_files",
    "read_source",
    "source_fingerprint",
]

SourceConfig = Annotated[
    StdlibSource
    | TextDirSource
    | JsonlSource
    | JsonSource
    | ParquetSource
    | WarcSource
    | CodeSource
    | ConversationsSource
    | BooksSource,
    Field(discriminator="type"),
]

_READERS: dict[str, Callable[..., Iterator[Document | Reject]]] = {
    "python-stdlib": read_stdlib,
    "text-dir": read_text_dir,
    "jsonl": read_jsonl,
    "json": read_json,
    "parquet": read_parquet,
    "warc": read_warc,
    "code": read_code,
    "conversations": read_conversations,
    "books": read_books,
}


def read_source(
    cfg: SourceConfig, notes: dict[str, Any] | None = None, ledger: SourceLedger | None = None
) -> Iterator[Document | Reject]:
    """Documents and rejects of one source; `notes` collects source-specific facts for the manifest,
    `ledger` the files read (with their sha256), and it refuses files that break the source's pins."""
    reader: Callable[..., Iterator[Document | Reject]] = _READERS[cfg.type]
    return reader(cfg, {} if notes is None else notes, ledger or SourceLedger.for_config(cfg))


def source_fingerprint(cfg: SourceConfig) -> str:
    """A cheap digest of what a source would read now: each file's path, size and mtime (for a
    remote object: size, etag and modification time, from one listing).

    The pipeline mixes it into the stage key (Stage.fingerprint), so an edited file under an
    unchanged config makes a new corpus instead of reusing a stale one.
    """
    if isinstance(cfg, StdlibSource):
        root = cfg.root
        digest = hashlib.sha256(f"{cfg.type}\0{root}\0{sys.version}".encode())
        files = [root / rel for rel, _ in list_stdlib_files(root, cfg.include_tests)] if root.is_dir() else []
        for path in files:
            stat = path.stat()
            digest.update(f"\0{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
    digest = hashlib.sha256(f"{cfg.type}\0{cfg.path}".encode())
    for line in file_fingerprint_lines(cfg):
        digest.update(f"\0{line}".encode())
    return digest.hexdigest()
