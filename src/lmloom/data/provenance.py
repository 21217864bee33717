"""Provenance of a corpus: every file a source read, with the sha256 of the bytes read, checked
against the source's pins.

Readers hash a file's bytes while they read them (never a second pass), so the record says exactly
what went into the corpus even if the file changes a moment later. `data.prepare` writes the records
as `sources.jsonl` (format: lmloom.artifacts.lineage) and `lmloom artifacts lineage` reads them back.

A source config may pin what it reads (`Pins`, `Digest`); a pinned file that is missing, unreadable or
holds other bytes is refused with an IntegrityError naming the file and both digests, which fails the
stage before anything is published.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO

from pydantic import AfterValidator, BeforeValidator, Field

from lmloom.artifacts.lineage import listing_digest
from lmloom.errors import IntegrityError


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _relative_posix(value: str) -> str:
    parts = PurePosixPath(value).parts
    if not value or value.startswith("/") or "\\" in value or any(p in ("..", ".") for p in value.split("/")):
        raise ValueError("a pin names a file by its path relative to the source, with / between parts")
    return "/".join(parts)


Sha256Hex = Annotated[str, BeforeValidator(_lower), Field(pattern=r"^[0-9a-f]{64}$")]
RelativePath = Annotated[str, AfterValidator(_relative_posix)]


# The pin fields every source config carries. Pins are config, so they are part of the stage key.
Pins = Annotated[
    dict[RelativePath, Sha256Hex],
    Field(
        description=(
            "pin files by sha256: {path relative to the source (for a single jsonl file, its name): "
            "sha256 hex}; each pinned file must be read and hold exactly those bytes, else the stage "
            "is refused (IntegrityError) before anything is published. Copy values from the corpus's "
            "sources.jsonl (`lmloom artifacts lineage ID --format json`) or from `sha256sum`."
        )
    ),
]
Digest = Annotated[
    Sha256Hex | None,
    Field(
        description=(
            "pin the whole set of files the source reads: sha256 of the `sha256sum`-style listing "
            "'<sha256>  <relative path>\\n' of every file read, sorted by path; an added, removed, "
            "renamed or edited file is refused. The current value is the source's `digest` in the "
            "corpus metadata (`lmloom artifacts show ID`) and in `lineage --format json`."
        )
    ),
]


@dataclass(eq=False)
class FileRecord:
    """One file a source read: where, which bytes, and what became of the documents it gave."""

    source_index: int
    source: str
    type: str
    path: str  # absolute, as read (a URL such as s3://bucket/key for a remote file)
    relpath: str  # relative to the source's root: what pins and the source digest name
    size: int | None = None  # bytes read; None until read, or when the file could not be read
    sha256: str | None = None
    error: str | None = None
    documents: int = 0  # documents read from it
    kept: int = 0  # ... that passed every cleaning step into the corpus
    removed: int = 0  # ... that a cleaning step dropped
    rejected: int = 0  # records of it that could not become documents

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "source_index": self.source_index,
            "source": self.source,
            "type": self.type,
            "path": self.path,
            "relpath": self.relpath,
            "size": self.size,
            "sha256": self.sha256,
            "documents": self.documents,
            "kept": self.kept,
            "removed": self.removed,
            "rejected": self.rejected,
        }
        if self.error:
            record["error"] = self.error
        return record


class SourceLedger:
    """The files one source reads, each checked against the source's pins as soon as it is hashed.

    A reader calls `expect` once it knows which files it will read (refusing missing pinned files
    before reading anything), `read_bytes` or `start` + `finish_file` for each file, and `finish` at
    the end (refusing pins of files it never read and a mismatched `digest`).
    """

    def __init__(
        self,
        source: str,
        type: str,
        pins: dict[str, str] | None = None,
        digest: str | None = None,
        index: int = 0,
    ):
        self.source, self.type, self.index = source, type, index
        self.pins = dict(pins or {})
        self.pinned_digest = digest
        self.root: Path | str | None = None
        self.files: list[FileRecord] = []

    @classmethod
    def for_config(cls, cfg: Any, index: int = 0) -> SourceLedger:
        """The ledger of a source config (any with `label`, `type`, `pinned_files()` and `digest`)."""
        return cls(cfg.label, cfg.type, cfg.pinned_files(), cfg.digest, index)

    def expect(
        self, root: Path | str, relpaths: list[str], exists: Callable[[str], bool] | None = None
    ) -> None:
        """Before reading: every pinned file must exist and be among the files the source reads.

        `root` is a local directory or a URL (then `exists(relpath)` says whether a file is there)."""
        self.root = root
        readable = set(relpaths)
        for rel, sha256 in sorted(self.pins.items()):
            if rel in readable:
                continue
            path = join_location(root, rel)
            if not (exists(rel) if exists is not None else Path(path).exists()):
                raise IntegrityError(
                    f"{self.source}: pinned file {path} is missing (expected sha256 {sha256})"
                )
            raise IntegrityError(
                f"{self.source}: pinned file {path} is not among the files this source reads "
                f"(check its patterns; hidden files are skipped)"
            )

    def start(self, path: Path | str, relpath: str) -> FileRecord:
        record = FileRecord(self.index, self.source, self.type, absolute_location(path), relpath)
        self.files.append(record)
        return record

    def finish_file(
        self, record: FileRecord, sha256: str | None, size: int | None, error: str | None = None
    ) -> None:
        record.sha256, record.size, record.error = sha256, size, error
        expected = self.pins.get(record.relpath)
        if expected is None:
            return
        if sha256 is None:
            raise IntegrityError(
                f"{self.source}: pinned file {record.path} could not be read ({error}); expected sha256 {expected}"
            )
        if sha256 != expected:
            raise IntegrityError(
                f"{self.source}: {record.path} does not match its pin (expected sha256 {expected}, "
                f"actual {sha256}); the source changed since it was pinned"
            )

    def read_bytes(self, path: Path | str, relpath: str, data: bytes) -> FileRecord:
        """Record (and check) a file read whole."""
        record = self.start(path, relpath)
        self.finish_file(record, hashlib.sha256(data).hexdigest(), len(data))
        return record

    def unreadable(self, path: Path | str, relpath: str, exc: BaseException) -> FileRecord:
        record = self.start(path, relpath)
        self.finish_file(record, None, None, f"{type(exc).__name__}: {exc}")
        return record

    @property
    def digest(self) -> str:
        return listing_digest((f.relpath, f.sha256) for f in self.files)

    def finish(self) -> None:
        read = {f.relpath for f in self.files}
        for rel, sha256 in sorted(self.pins.items()):
            if rel not in read:
                where = join_location(self.root, rel) if self.root else rel
                raise IntegrityError(
                    f"{self.source}: pinned file {where} was not read (left out by a size cap, or missing); "
                    f"expected sha256 {sha256}"
                )
        if self.pinned_digest and self.digest != self.pinned_digest:
            raise IntegrityError(
                f"{self.source}: the {len(self.files):,} files read from {self.root} do not match the "
                f"pinned digest (expected {self.pinned_digest}, actual {self.digest}); a file was added, "
                f"removed, renamed or changed since it was pinned (pin single files with `pins` to see which)"
            )


def is_url(location: Path | str) -> bool:
    """A location such as s3://bucket/key or memory://x rather than a local path."""
    return isinstance(location, str) and "://" in location


def absolute_location(location: Path | str) -> str:
    """A local path made absolute (see `printable`); a URL as it is."""
    return str(location) if is_url(location) else printable(str(Path(location).absolute()))


def printable(path: str) -> str:
    """A local path as text that can be written: a file name that is not UTF-8 (Python holds its bytes
    as lone surrogates, which no JSON writer can encode) shows those bytes as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def join_location(root: Path | str, relpath: str) -> str:
    if is_url(root):
        return f"{str(root).rstrip('/')}/{relpath}"
    return str(Path(root) / relpath)


class HashingReader(io.RawIOBase):
    """A raw reader that hashes every byte it passes on, so a streamed file is hashed as it is parsed."""

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0
        self.complete = False  # the end of the file was reached: the digest covers all of it

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if hasattr(self._raw, "readinto"):
            n = self._raw.readinto(buffer)
        else:  # a file-like object that only offers read()
            data = self._raw.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        if n:
            with memoryview(buffer) as view:
                self._digest.update(view[:n])
            self.size += n
        elif n == 0:
            self.complete = True
        return n or 0

    def drain(self) -> None:
        """Hash the rest of the file, which the parser did not need (e.g. after a corrupt .gz stream)."""
        buffer = bytearray(1 << 20)
        while self.readinto(buffer):
            pass

    @property
    def sha256(self) -> str | None:
        return self._digest.hexdigest() if self.complete else None
