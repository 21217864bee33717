"""Token shards: each split's token stream as raw little-endian integer files, read by memory map.

Layout of a shards directory (all raw binary + one JSON header; nothing is pickled):

    shards.json            header: format, version, dtype, vocab size, eos id, and per split its
                           shard files (with token counts), index file, token and document counts
    train-00000.bin ...    token ids, dtype `uint16` when vocab_size <= 65,536 else `uint32`;
                           every shard holds exactly `max_tokens_per_shard` tokens except the last
    train.idx              document index: `uint64`, n_docs + 1 token offsets into the split's stream;
                           document i is tokens [idx[i], idx[i+1]), its last token is EOS

A split is one continuous stream: every document is followed by one EOS token, and documents may
cross shard boundaries (shards are only a size limit on files). Document i is the i-th document
added, so a token position leads back to the corpus record it came from.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lmloom.artifacts.atomic import write_text_atomic
from lmloom.artifacts.files import LocalDir
from lmloom.artifacts.store import Artifact, ArtifactWriter
from lmloom.errors import IntegrityError, LmloomError

HEADER_FILE = "shards.json"
FORMAT = "lmloom.token-shards"
FORMAT_VERSION = 1
DEFAULT_MAX_TOKENS_PER_SHARD = 100_000_000
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_INDEX_DTYPE = np.dtype("<u8")


def token_dtype(vocab_size: int) -> str:
    """Name of the smallest dtype that holds every id of a vocabulary: 'uint16' or 'uint32'."""
    if vocab_size < 1 or vocab_size > 2**32:
        raise LmloomError(f"vocab_size = {vocab_size}: must be between 1 and 2**32")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


def index_name(split: str) -> str:
    return f"{split}.idx"


class _SplitWriter:
    """Appends documents to one split; opened through `ShardWriter.split`."""

    def __init__(self, owner: ShardWriter, name: str):
        self._owner = owner
        self.name = name
        self.n_tokens = 0
        self.n_docs = 0
        self.shards: list[dict[str, Any]] = []  # {"file": name, "tokens": count}
        self._shard: BinaryIO | None = None
        self._index = owner.open_file(index_name(name))  # closed in close()
        self._index.write(np.zeros(1, _INDEX_DTYPE).tobytes())  # offset of document 0

    def add(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append one document's token ids; EOS is appended after it."""
        return self.add_batch([ids])

    def add_batch(self, docs: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        """Append several documents (each followed by EOS) with one bulk conversion.

        Returns the tokens written (EOS included), in the stored dtype.
        """
        if not docs:
            return np.zeros(0, self._owner.dtype)
        owner = self._owner
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs)) + 1
        ends = np.cumsum(lengths)
        stream = np.full(int(ends[-1]), owner.eos_id, dtype=np.int64)
        is_text = np.ones(stream.size, dtype=bool)
        is_text[ends - 1] = False
        stream[is_text] = np.fromiter(
            itertools.chain.from_iterable(docs), dtype=np.int64, count=int(ends[-1]) - len(docs)
        )
        low, high = int(stream.min()), int(stream.max())
        if low < 0 or high >= owner.vocab_size:
            bad = low if low < 0 else high
            raise LmloomError(
                f"split {self.name}: token id {bad} is outside the vocabulary [0, {owner.vocab_size})"
            )
        tokens = stream.astype(owner.dtype)
        self._write(tokens)
        self._index.write((ends + self.n_tokens).astype(_INDEX_DTYPE).tobytes())
        self.n_tokens += int(ends[-1])
        self.n_docs += len(docs)
        return tokens

    def _write(self, tokens: np.ndarray) -> None:
        limit = self._owner.max_tokens_per_shard
        while tokens.size:
            if self._shard is None or self.shards[-1]["tokens"] == limit:
                self._rotate()
            room = limit - self.shards[-1]["tokens"]
            piece, tokens = tokens[:room], tokens[room:]
            self._shard.write(piece.tobytes())
            self.shards[-1]["tokens"] += int(piece.size)

    def _rotate(self) -> None:
        if self._shard is not None:
            self._shard.close()
        name = shard_name(self.name, len(self.shards))
        self._shard = self._owner.open_file(name)  # closed in close()
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        self._index.close()

    def header(self) -> dict[str, Any]:
        return {
            "tokens": self.n_tokens,
            "documents": self.n_docs,
            "index": index_name(self.name),
            "shards": [dict(s) for s in self.shards],
        }


class ShardWriter:
    """Writes the token streams of one or more splits and, on `close`, the `shards.json` header.

        with ShardWriter(out_dir, vocab_size=tok.vocab_size, eos_id=tok.eos_id) as writer:
            writer.add("train", ids)            # or writer.split("train").add_batch(list_of_ids)

    A split named with `split()` exists in the header even if no document is added to it.
    On an exception inside the `with` block the files are closed but no header is written.
    """

    def __init__(
        self,
        target: Path | str | ArtifactWriter,
        *,
        vocab_size: int,
        eos_id: int,
        max_tokens_per_shard: int = DEFAULT_MAX_TOKENS_PER_SHARD,
    ):
        if max_tokens_per_shard < 1:
            raise LmloomError(f"max_tokens_per_shard = {max_tokens_per_shard}: must be at least 1")
        if not 0 <= eos_id < vocab_size:
            raise LmloomError(f"eos_id = {eos_id} is outside the vocabulary [0, {vocab_size})")
        self._target = target if isinstance(target, ArtifactWriter) else Path(target)
        if isinstance(self._target, Path):
            self._target.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.dtype_name = token_dtype(vocab_size)
        self.dtype = _DTYPES[self.dtype_name]
        self.max_tokens_per_shard = max_tokens_per_shard
        self._splits: dict[str, _SplitWriter] = {}
        self._closed = False

    def open_file(self, name: str) -> BinaryIO:
        """A new binary file in the target (through the artifact's codec when it is an artifact)."""
        if isinstance(self._target, ArtifactWriter):
            return self._target.open(name)
        return open(self._target / name, "wb")  # noqa: SIM115 - closed by the split writer

    def split(self, name: str) -> _SplitWriter:
        if self._closed:
            raise LmloomError("ShardWriter is closed")
        if name not in self._splits:
            if not name or not all(c.isalnum() or c in "_." for c in name) or name.startswith("."):
                raise LmloomError(f"split name {name!r}: use letters, digits, '_' and '.'")
            self._splits[name] = _SplitWriter(self, name)
        return self._splits[name]

    def add(self, split: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.split(split).add(ids)

    def add_batch(self, split: str, docs: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        return self.split(split).add_batch(docs)

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": self.dtype_name,
            "byte_order": "little",
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "max_tokens_per_shard": self.max_tokens_per_shard,
            "splits": {name: split.header() for name, split in self._splits.items()},
        }

    def close(self) -> dict[str, Any]:
        """Close every file and write `shards.json`; returns the header."""
        self._close_files()
        header = self.header()
        text = json.dumps(header, indent=2) + "\n"
        if isinstance(self._target, ArtifactWriter):
            self._target.write_text(HEADER_FILE, text)
        else:
            write_text_atomic(self._target / HEADER_FILE, text)
        return header

    def _close_files(self) -> None:
        self._closed = True
        for split in self._splits.values():
            split.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()


def _files(source: Path | str | Artifact | LocalDir) -> Artifact | LocalDir:
    return source if isinstance(source, Artifact | LocalDir) else LocalDir(source)


def read_header(source: Path | str | Artifact | LocalDir) -> dict[str, Any]:
    """The validated `shards.json` of a shards directory or artifact."""
    files = _files(source)
    path = f"{files.short_id}: {HEADER_FILE}"
    if not files.has(HEADER_FILE):
        raise LmloomError(f"{files.short_id} has no {HEADER_FILE}; is it a token-shards artifact?")
    try:
        header = json.loads(files.read_text(HEADER_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IntegrityError(f"{path}: not a {FORMAT} header")
    if header.get("version") != FORMAT_VERSION:
        raise LmloomError(
            f"{path}: format version {header.get('version')!r}, this lmloom reads version {FORMAT_VERSION}"
        )
    if header.get("dtype") not in _DTYPES:
        raise IntegrityError(f"{path}: dtype {header.get('dtype')!r}, expected one of {', '.join(_DTYPES)}")
    return header


class _RangeReader:
    """Array-like slicing (`reader[a:b]`) over a seekable binary reader of `count` items of `dtype`."""

    def __init__(self, handle: BinaryIO, dtype: np.dtype, count: int):
        self._handle, self._dtype, self._count = handle, dtype, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self._count)
        if step != 1:
            raise IndexError("token ranges are contiguous")
        size = self._dtype.itemsize
        self._handle.seek(start * size)
        data = self._handle.read(max(0, stop - start) * size)
        return np.frombuffer(data, dtype=self._dtype)


class TokenShards:
    """One split of a shards directory or artifact: its token stream and its documents.

    Plaintext shards are memory-mapped; encrypted ones are read range by range through the artifact's
    codec, which decrypts only the chunks a range touches.
    """

    def __init__(self, source: Path | str | Artifact | LocalDir, split: str):
        self.files = _files(source)
        self.split = split
        header = read_header(self.files)
        splits = header.get("splits", {})
        if split not in splits:
            raise LmloomError(
                f"{self.files.short_id}: no split {split!r}; splits: {', '.join(splits) or 'none'}"
            )
        info = splits[split]
        self.header = header
        self.dtype = _DTYPES[header["dtype"]]
        self.vocab_size = int(header["vocab_size"])
        self.eos_id = int(header["eos_id"])
        self.n_tokens = int(info["tokens"])
        self.n_docs = int(info["documents"])

        counts = [int(s["tokens"]) for s in info["shards"]]
        if sum(counts) != self.n_tokens:
            raise IntegrityError(f"{HEADER_FILE}: split {split} shard token counts do not add up")
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._shards = [
            self._map(s["file"], self.dtype, n) for s, n in zip(info["shards"], counts, strict=True)
        ]
        self.offsets = self._map(info["index"], _INDEX_DTYPE, self.n_docs + 1)[:]  # small: held whole
        if self.offsets[0] != 0 or self.offsets[-1] != self.n_tokens:
            raise IntegrityError(f"{info['index']}: document offsets do not span the {split} split")

    def _map(self, name: str, dtype: np.dtype, count: int) -> np.ndarray | _RangeReader:
        where = f"{self.files.short_id}: {HEADER_FILE}"
        if not isinstance(name, str) or Path(name).name != name:
            raise IntegrityError(f"{where}: file name {name!r} is not a plain file name")
        if not self.files.has(name):
            raise IntegrityError(f"{self.files.short_id}: file {name} is missing")
        size = self.files.size(name)
        if size != count * dtype.itemsize:
            raise IntegrityError(
                f"{self.files.short_id}/{name}: {size} bytes, the header says "
                f"{count} x {dtype.itemsize} = {count * dtype.itemsize}"
            )
        if count == 0:
            return np.zeros(0, dtype)  # mmap cannot map an empty file
        path = self.files.plain_path(name)
        if path is None:
            return _RangeReader(self.files.open(name), dtype, count)
        return np.asarray(np.memmap(path, dtype=dtype, mode="r", shape=(count,)))  # plain read-only view

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream, across shard boundaries.

        Returns a read-only view of the memory map when the range lies in one shard, else a copy;
        the dtype is the stored one (uint16 or uint32).
        """
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(
                f"token range [{start}, {stop}) is outside the {self.split} split [0, {self.n_tokens})"
            )
        if start == stop:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop, side="left")) - 1
        if first == last:
            base = self._starts[first]
            return self._shards[first][start - base : stop - base]
        pieces = []
        for k in range(first, last + 1):
            base = int(self._starts[k])
            lo, hi = max(start, base) - base, min(stop, int(self._starts[k + 1])) - base
            pieces.append(self._shards[k][lo:hi])
        return np.concatenate(pieces)

    def document_span(self, i: int) -> tuple[int, int]:
        """[start, stop) of document i in the stream, including its trailing EOS."""
        if i < 0:
            i += self.n_docs
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} is outside the {self.split} split ({self.n_docs} documents)")
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def document(self, i: int, with_eos: bool = False) -> np.ndarray:
        """Token ids of document i (without its trailing EOS unless `with_eos`)."""
        start, stop = self.document_span(i)
        return self.tokens(start, stop if with_eos else stop - 1)

    def documents(self) -> Iterable[np.ndarray]:
        for i in range(self.n_docs):
            yield self.document(i)
