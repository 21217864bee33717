"""What every file-based source shares: the config fields, listing and pinning the files, and reading
each file exactly once while it is hashed into the source's ledger.

Three ways to read a file, all hashing the very bytes that are parsed:

    read_whole      the file in memory (text files, source code, a book), capped by a size limit
    read_stream     a stream for parsers that read front to back (JSONL, WARC), decompressed
                    on the fly for .gz and .zst; an error mid-file keeps what was read and turns
                    the rest into one `unreadable-file` reject
    read_seekable   a seekable file for formats that read their footer first (Parquet, EPUB): a local
                    file is hashed and then parsed through the same open handle; a remote one is
                    spooled to a temporary file while it is hashed
"""

from __future__ import annotations

import gzip
import io
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.data.documents import UNREADABLE_FILE, Document, Reject
from lmloom.data.provenance import Digest, FileRecord, HashingReader, Pins, SourceLedger
from lmloom.data.sources.storage import Location, SourceFile, StorageOptions, Store
from lmloom.errors import DataError

# What a damaged file raises while it is parsed: the file is quarantined, the run goes on.
try:
    from zstandard import ZstdError
except ImportError:  # pragma: no cover - zstandard is a dependency of the .zst readers only

    class ZstdError(Exception):  # type: ignore[no-redef]
        pass


PARSE_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, ZstdError, ValueError)


class FileSource(StrictConfig):
    """Fields of every source that reads files under a local path or URL."""

    path: Location
    storage_options: StorageOptions = {}
    name: str | None = None  # defaults to "<type>:<path>"
    pins: Pins = {}
    digest: Digest = None
    sensitive: bool = Field(
        False, description="the text may hold personal data: never copied into removed.jsonl (data.prepare)"
    )

    @property
    def label(self) -> str:
        return self.name or f"{self.type}:{self.path}"  # type: ignore[attr-defined]

    def pinned_files(self) -> dict[str, str]:
        return dict(self.pins)

    def file_patterns(self) -> list[str]:
        """Glob patterns of the files this source reads under a directory."""
        raise NotImplementedError

    def store(self) -> Store:
        return Store(self.label, self.path, self.storage_options)


def list_files(
    cfg: FileSource, store: Store, ledger: SourceLedger, single_file: bool = True, allow_empty: bool = False
) -> list[SourceFile]:
    """The files a source will read, checked against its pins before any is read.

    `single_file`: the path may name one file instead of a directory; `allow_empty`: a directory
    without matching files is not an error (the stage then says nothing was read)."""
    if not store.exists():
        if ledger.pins:  # a pinned input that is gone is an integrity failure, not just bad config
            ledger.expect(store.base if single_file else cfg.path, [], lambda rel: False)
        raise DataError(f"{cfg.label}: {cfg.path} does not exist")
    is_dir = store.is_dir()
    if not is_dir and not single_file:
        raise DataError(f"{cfg.label}: {cfg.path} is not a directory")
    files = store.files(cfg.file_patterns())
    if not files and not allow_empty:
        raise DataError(f"{cfg.label}: {cfg.path} holds no files matching {', '.join(cfg.file_patterns())}")
    ledger.expect(store.base, [f.relpath for f in files], store.exists_rel)
    return files


def file_fingerprint_lines(cfg: FileSource) -> Iterator[str]:
    """`relpath:size:mtime[:etag]` of each file the source would read now (nothing if it is gone)."""
    store = cfg.store()
    if not store.exists():
        return
    for file in store.files(cfg.file_patterns()):
        yield f"{file.relpath}:{file.stamp}"


def reject_unreadable(label: str, where: str, exc: BaseException | str, origin: Any) -> Reject:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return Reject(label, where, UNREADABLE_FILE, detail=detail, origin=origin)


# -- whole files ---------------------------------------------------------------------------------


def read_whole(
    store: Store, file: SourceFile, ledger: SourceLedger
) -> tuple[bytes | None, FileRecord, str | None]:
    """The file's bytes (recorded and checked against its pin), or None and why it could not be read."""
    try:
        data = store.read_bytes(file)
    except OSError as exc:
        problem = store.describe(exc)
        origin = ledger.start(file.location, file.relpath)
        ledger.finish_file(origin, None, None, problem)
        return None, origin, problem
    return data, ledger.read_bytes(file.location, file.relpath, data), None


# -- streams -------------------------------------------------------------------------------------


@dataclass
class Cursor:
    """Where a streaming parser is, so an error mid-file can say where the file broke."""

    where: str


def read_stream(
    label: str,
    store: Store,
    file: SourceFile,
    ledger: SourceLedger,
    parse: Callable[[BinaryIO, FileRecord, Cursor], Iterator[Document | Reject]],
    decompress: bool = True,
) -> Iterator[Document | Reject]:
    """Run `parse` over the file's (decompressed) bytes while they are hashed; a parse error keeps
    what was read and rejects the rest of the file as unreadable."""
    origin = ledger.start(file.location, file.relpath)
    hashed: HashingReader | None = None
    problem: str | None = None
    cursor = Cursor(f"{file}:1")
    try:
        with store.open(file) as raw:
            hashed = HashingReader(raw)
            try:
                buffered = io.BufferedReader(hashed, 1 << 20)
                stream = decompressed(buffered, file.name) if decompress else buffered
                yield from parse(stream, origin, cursor)
            except PARSE_ERRORS as exc:  # e.g. a truncated .gz: keep what was read
                problem = store.describe(exc)
            hashed.drain()  # the sha256 covers the whole file, also past a corrupt stream
    except OSError as exc:  # the file itself cannot be opened or read
        problem = problem or store.describe(exc)
    if problem is not None:
        yield reject_unreadable(label, cursor.where, problem, origin)
    if hashed is not None and hashed.sha256 is not None:
        ledger.finish_file(origin, hashed.sha256, hashed.size)  # refuses a pinned file with other bytes
    else:
        ledger.finish_file(origin, None, None, problem)


def decompressed(stream: BinaryIO, name: str) -> BinaryIO:
    """The stream decompressed by its name's suffix (.gz, .zst), or as it is."""
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if name.endswith(".zst") or name.endswith(".zstd"):
        return io.BufferedReader(ZstdReader(stream), 1 << 20)  # type: ignore[return-value]
    return stream


class ZstdReader(io.RawIOBase):
    """Streaming zstd decompression that notices a truncated file.

    zstandard's own stream_reader returns what it decoded and stops silently when the input ends
    inside a frame; this reader raises EOFError instead, so the file is reported as unreadable. The
    compressed input is fed in small chunks, so even a highly compressible record (a "zip bomb")
    never inflates more than ~11 MB at once.
    """

    # compressed bytes per step: a zstd RLE block inflates ~3 bytes to 128 KiB, so even all-RLE input
    # gives at most ~11 MB per step; measured at ~250 MB/s of output on ordinary JSONL
    _CHUNK = 256

    def __init__(self, raw: BinaryIO):
        super().__init__()
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        self._decoder: Any = None  # the decompressor of the frame being read, None between frames
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            chunk = self._raw.read(self._CHUNK)
            if not chunk:
                if self._decoder is not None:
                    raise EOFError("truncated zstd file: it ends inside a frame")
                return 0
            self._out, self._pos = self._feed(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _feed(self, chunk: bytes) -> bytes:
        output = []
        while chunk:
            if self._decoder is None:
                self._decoder = self._zstd.ZstdDecompressor().decompressobj()
            output.append(self._decoder.decompress(chunk))
            if not self._decoder.eof:
                break
            chunk = self._decoder.unused_data  # the next frame starts in the same chunk
            self._decoder = None
        return b"".join(output)


# -- seekable files ------------------------------------------------------------------------------


@contextmanager
def read_seekable(
    store: Store, file: SourceFile, ledger: SourceLedger
) -> Iterator[tuple[BinaryIO | None, FileRecord, str | None]]:
    """A seekable handle on the file's bytes once they are hashed and recorded (None and the problem
    when it cannot be read). Local files are hashed, then parsed through the same open handle;
    remote files are spooled to a temporary file while they are hashed."""
    origin = ledger.start(file.location, file.relpath)
    with ExitStack() as stack:
        handle: BinaryIO | None = None
        problem: str | None = None
        try:
            raw = stack.enter_context(store.open(file))
            hashed = HashingReader(raw)
            if store.remote:
                spool = stack.enter_context(tempfile.TemporaryFile())
                shutil.copyfileobj(hashed, spool, 1 << 20)  # type: ignore[misc]
                handle = spool  # type: ignore[assignment]
            else:
                hashed.drain()
                handle = raw
            handle.seek(0)  # type: ignore[union-attr]
        except OSError as exc:
            problem = store.describe(exc)
        if problem is None:
            ledger.finish_file(origin, hashed.sha256, hashed.size)  # refuses a pinned file with other bytes
        else:
            handle = None
            ledger.finish_file(origin, None, None, problem)
        yield handle, origin, problem
