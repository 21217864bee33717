"""Encryption at rest: artifact files as chunked AES-256-GCM, readable at random positions.

A file is cut into plaintext chunks (1 MiB by default), each sealed on its own, so a reader decrypts
only the chunks a read touches: a token-shard loader reading one training window decrypts (at most)
the one or two chunks under it, and keeps a few decrypted chunks in a small LRU.

Stored file layout (all integers little-endian):

    offset 0    8 bytes  magic  b"LMLENC" 0x01 0x00   (format version 1)
    offset 8    4 bytes  chunk_size       uint32: plaintext bytes per chunk (the last may be shorter)
    offset 12   8 bytes  plaintext_size   uint64: total plaintext bytes
    offset 20   chunk 0, chunk 1, ..., chunk n-1, each   nonce (12) || ciphertext (len) || tag (16)

n = max(1, ceil(plaintext_size / chunk_size)): an empty file still has one (empty) final chunk, so it
is authenticated too. A file is therefore exactly 20 + 28 n + plaintext_size bytes long.

Keys. Every file has its own AES-256 key, derived from the data-encryption key (DEK, see
`lmloom.security.keyring`) by HKDF-SHA256 with salt = the writer's 16-byte binding and info =
"lmloom.enc.v1 file key" 0x00 || file name. Every chunk has a fresh random 96-bit nonce.

Associated data of chunk i:

    b"lmloom.enc.v1" 0x00 || binding (16) || chunk_size (u32) || len(name) (u32) || name (UTF-8)
    || i (u64) || last (u8: 1 for the final chunk, else 0) || total (u64: plaintext_size for the
    final chunk, else 0)

so a chunk cannot be moved to another position (index), another file (name and key), another
artifact (binding and key), and the stream cannot be cut or extended (only the true final chunk
carries last = 1 and the total length). A streaming writer learns the total length only when it
closes, so the length is bound by the final chunk; a reader authenticates the final chunk when it
opens the file, before returning any byte, so a truncated, extended or re-headed file is refused at
open even if the read touches only the first chunk.

The binding. An artifact's id is the hash of its manifest, and the manifest holds the hashes of the
ciphertext, so the id cannot be inside the ciphertext's associated data. Each artifact writer draws a
random 128-bit binding instead and records it in the manifest's `encryption` header (`header()`);
the header is part of the manifest and so covered by the artifact id, which makes the binding as
good as the id: chunks of one artifact do not authenticate in any other.
"""

from __future__ import annotations

import io
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lmloom.errors import IntegrityError, SecurityError

SCHEME = "lmloom.aes-256-gcm-chunked/v1"
MAGIC = b"LMLENC\x01\x00"
_FILE_HEADER = struct.Struct("<8sIQ")  # magic, chunk_size, plaintext_size
HEADER_SIZE = _FILE_HEADER.size  # 20
NONCE_SIZE = 12
TAG_SIZE = 16
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 1 << 26
DEFAULT_CACHE_CHUNKS = 8
BINDING_SIZE = 16
ENV_CHUNK_SIZE = "LMLOOM_ENCRYPTION_CHUNK_SIZE"
_UNFINISHED = 2**64 - 1  # plaintext_size of a file whose writer never closed
_AAD_LABEL = b"lmloom.enc.v1\x00"
_KEY_INFO = b"lmloom.enc.v1 file key\x00"
_AAD_TAIL = struct.Struct("<QBQ")  # chunk index, last flag, total plaintext size (final chunk only)


def chunk_size_from_env() -> int:
    """`LMLOOM_ENCRYPTION_CHUNK_SIZE` (bytes) when set, else 1 MiB."""
    raw = os.environ.get(ENV_CHUNK_SIZE)
    if not raw:
        return DEFAULT_CHUNK_SIZE
    try:
        return _check_chunk_size(int(raw), ENV_CHUNK_SIZE)
    except ValueError:
        raise SecurityError(f"{ENV_CHUNK_SIZE} = {raw!r}: give a whole number of bytes") from None


def _check_chunk_size(size: Any, where: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_CHUNK_SIZE:
        raise SecurityError(
            f"{where} = {size!r}: the chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes"
        )
    return size


def n_chunks(plaintext_size: int, chunk_size: int) -> int:
    return max(1, -(-plaintext_size // chunk_size))


def stored_size(plaintext_size: int, chunk_size: int) -> int:
    """Bytes on disk of a file with this much plaintext."""
    return HEADER_SIZE + CHUNK_OVERHEAD * n_chunks(plaintext_size, chunk_size) + plaintext_size


class ChunkedAesGcmCodec:
    """The `Codec` of encrypted artifacts (see the module docstring for the format).

    One instance serves one artifact (one binding). `for_writing` draws a fresh binding;
    `from_header` rebuilds the reader of a stored artifact from its manifest's `encryption` header.
    The DEK is held privately and never appears in `repr`, `header()` or any error message.
    """

    def __init__(
        self,
        dek_id: str,
        dek: bytes,
        *,
        binding: bytes,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        where: str = "new artifact",
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        on_failure: Callable[[IntegrityError], None] | None = None,
    ):
        if len(dek) != 32:
            raise SecurityError(f"data-encryption key {dek_id} has the wrong length (AES-256 needs 32 bytes)")
        if len(binding) != BINDING_SIZE:
            raise SecurityError(f"{where}: encryption binding must be {BINDING_SIZE} bytes")
        self.dek_id = dek_id
        self.__dek = dek
        self.binding = binding
        self.chunk_size = _check_chunk_size(chunk_size, "chunk_size")
        self.where = where
        self.cache_chunks = max(0, cache_chunks)  # 0: no cache, every read decrypts what it touches
        self.on_failure = on_failure  # told of every refused file or chunk before it is raised (audit)

    def __repr__(self) -> str:
        return f"ChunkedAesGcmCodec(dek={self.dek_id}, binding={self.binding.hex()}, chunk_size={self.chunk_size})"

    @classmethod
    def for_writing(cls, dek_id: str, dek: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkedAesGcmCodec:
        return cls(dek_id, dek, binding=os.urandom(BINDING_SIZE), chunk_size=chunk_size)

    @classmethod
    def from_header(
        cls,
        header: dict[str, Any],
        key_for: Callable[[str], bytes],
        where: str,
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        on_failure: Callable[[IntegrityError], None] | None = None,
    ) -> ChunkedAesGcmCodec:
        """The reader for a stored header; `key_for(dek_id)` unwraps the DEK it names."""
        if not isinstance(header, dict) or header.get("scheme") != SCHEME:
            scheme = header.get("scheme") if isinstance(header, dict) else header
            raise SecurityError(f"{where} uses encryption scheme {scheme!r}; this lmloom reads {SCHEME}")
        dek_id, binding = header.get("dek"), header.get("binding")
        if not isinstance(dek_id, str) or not dek_id:
            raise IntegrityError(f"{where}: the encryption header names no key")
        try:
            raw_binding = bytes.fromhex(binding) if isinstance(binding, str) else b""
        except ValueError:
            raw_binding = b""
        if len(raw_binding) != BINDING_SIZE:
            raise IntegrityError(f"{where}: the encryption header's binding is malformed")
        chunk_size = _check_chunk_size(header.get("chunk_size"), f"{where}: encryption chunk_size")
        return cls(
            dek_id,
            key_for(dek_id),
            binding=raw_binding,
            chunk_size=chunk_size,
            where=where,
            cache_chunks=cache_chunks,
            on_failure=on_failure,
        )

    # -- the Codec protocol ------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "dek": self.dek_id,
            "chunk_size": self.chunk_size,
            "binding": self.binding.hex(),
        }

    def open_write(self, path: Path, name: str) -> BinaryIO:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _EncryptingWriter(self._file_cipher(name), open(path, "xb"))  # noqa: SIM115

    def open_read(self, path: Path, name: str) -> BinaryIO:
        return _DecryptingReader(self._file_cipher(name), path, self.cache_chunks)

    def plaintext_size(self, path: Path, name: str) -> int:
        with open(path, "rb") as handle:
            return self._file_cipher(name).check_layout(handle)

    def plain_path(self, path: Path) -> Path | None:
        return None

    # -- internals ---------------------------------------------------------------------------------
    def _file_cipher(self, name: str) -> _FileCipher:
        name_bytes = name.encode("utf-8")
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=self.binding, info=_KEY_INFO + name_bytes
        ).derive(self.__dek)
        aad_prefix = (
            _AAD_LABEL + self.binding + struct.pack("<II", self.chunk_size, len(name_bytes)) + name_bytes
        )
        return _FileCipher(
            AESGCM(key), aad_prefix, self.chunk_size, f"{self.where}: file {name}", self.on_failure
        )


class _FileCipher:
    """Seals and opens the chunks of one file (its derived key and associated-data prefix)."""

    def __init__(self, aead: AESGCM, aad_prefix: bytes, chunk_size: int, where: str, on_failure=None):
        self.aead, self.aad_prefix, self.chunk_size, self.where = aead, aad_prefix, chunk_size, where
        self.on_failure = on_failure

    def fail(self, problem: str) -> IntegrityError:
        error = IntegrityError(f"{self.where}: {problem}")
        if self.on_failure is not None:
            self.on_failure(error)
        return error

    def __repr__(self) -> str:
        return f"_FileCipher({self.where})"

    def _aad(self, index: int, last: bool, total: int) -> bytes:
        return self.aad_prefix + _AAD_TAIL.pack(index, int(last), total if last else 0)

    def seal(self, index: int, plaintext: bytes | memoryview, last: bool, total: int) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self.aead.encrypt(nonce, bytes(plaintext), self._aad(index, last, total))

    def open(self, index: int, sealed: bytes, last: bool, total: int) -> bytes:
        try:
            return self.aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], self._aad(index, last, total))
        except InvalidTag:
            raise self.fail(
                f"encrypted chunk {index} failed authentication (the ciphertext was altered, "
                "reordered, truncated or taken from another file)"
            ) from None

    def check_layout(self, handle: BinaryIO) -> int:
        """Validate the file header against the file's length; return the plaintext size."""
        raw = handle.read(HEADER_SIZE)
        if len(raw) != HEADER_SIZE:
            raise self.fail("too short for an encrypted file (truncated)")
        magic, chunk_size, size = _FILE_HEADER.unpack(raw)
        if magic != MAGIC:
            raise self.fail("not an lmloom encrypted file (bad magic bytes)")
        if chunk_size != self.chunk_size:
            raise self.fail(
                f"chunk size {chunk_size} differs from the artifact's {self.chunk_size} (altered)"
            )
        if size == _UNFINISHED:
            raise self.fail("the encrypted file was never finished (its writer did not close)")
        actual = os.fstat(handle.fileno()).st_size
        if actual != stored_size(size, chunk_size):
            raise self.fail(
                f"{actual} bytes on disk, but its header implies {stored_size(size, chunk_size)} "
                "(truncated, extended or altered)"
            )
        return size


class _EncryptingWriter(io.RawIOBase):
    """Buffers up to one chunk of plaintext; a chunk is sealed as soon as it is known not to be the last."""

    def __init__(self, cipher: _FileCipher, raw: BinaryIO):
        self._cipher, self._raw = cipher, raw
        self._chunk = cipher.chunk_size
        self._pending = bytearray()
        self._index = 0
        self._total = 0
        self._raw.write(_FILE_HEADER.pack(MAGIC, self._chunk, _UNFINISHED))

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a closed encrypted file")
        view = memoryview(data).cast("B")
        n, pos = len(view), 0
        while pos < n:
            if len(self._pending) == self._chunk:  # more data follows, so this chunk is not the last
                self._emit(self._pending, last=False)
                self._pending = bytearray()
            if not self._pending and n - pos > self._chunk:  # whole chunks straight from the caller
                self._emit(view[pos : pos + self._chunk], last=False)
                pos += self._chunk
                continue
            take = min(self._chunk - len(self._pending), n - pos)
            self._pending += view[pos : pos + take]
            pos += take
        self._total += n
        return n

    def _emit(self, plaintext, last: bool) -> None:
        self._raw.write(self._cipher.seal(self._index, plaintext, last, self._total_if_last(last)))
        self._index += 1

    def _total_if_last(self, last: bool) -> int:
        return self._total if last else 0

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._emit(self._pending, last=True)
            self._pending = bytearray()
            self._raw.seek(12)
            self._raw.write(struct.pack("<Q", self._total))
            self._raw.flush()
        finally:
            self._raw.close()
            super().close()


class _DecryptingReader(io.RawIOBase):
    """Seekable plaintext view of an encrypted file; decrypts only the chunks that reads touch."""

    def __init__(self, cipher: _FileCipher, path: Path, cache_chunks: int):
        self._cipher = cipher
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._pos = 0
        self._raw = open(path, "rb")  # noqa: SIM115 - closed in close()
        try:
            self._size = cipher.check_layout(self._raw)
            self._chunk = cipher.chunk_size
            self._n = n_chunks(self._size, self._chunk)
            self._plain(self._n - 1)  # authenticate the final chunk (length, header) before any read
        except BaseException:
            self._raw.close()
            raise

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def _plain(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        last = index == self._n - 1
        length = self._size - index * self._chunk if last else self._chunk
        self._raw.seek(HEADER_SIZE + index * (self._chunk + CHUNK_OVERHEAD))
        sealed = self._raw.read(length + CHUNK_OVERHEAD)
        plain = self._cipher.open(index, sealed, last, self._size if last else 0)
        if self._cache_chunks:
            self._cache[index] = plain
            if len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return plain

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed encrypted file")
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        pieces = []
        pos = self._pos
        while pos < end:
            index, offset = divmod(pos, self._chunk)
            plain = self._plain(index)
            piece = plain[offset : offset + (end - pos)]
            pieces.append(piece)
            pos += len(piece)
        self._pos = end
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def readall(self) -> bytes:
        return self.read(-1)

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer) -> int:
        data = self.read(len(memoryview(buffer).cast("B")))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def peek(self, size: int = 0) -> bytes:
        if self._pos >= self._size:
            return b""
        index, offset = divmod(self._pos, self._chunk)
        return self._plain(index)[offset:]

    def readline(self, size: int | None = -1) -> bytes:
        limit = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        pieces = []
        while self._pos < limit:
            index, offset = divmod(self._pos, self._chunk)
            plain = self._plain(index)
            stop = min(len(plain), offset + (limit - self._pos))
            newline = plain.find(b"\n", offset, stop)
            piece = plain[offset : stop if newline < 0 else newline + 1]
            pieces.append(piece)
            self._pos += len(piece)
            if newline >= 0:
                break
        return b"".join(pieces)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            self._cache.clear()
        super().close()
