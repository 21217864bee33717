"""How an artifact's files are stored on disk: the codec seam between stages and bytes at rest.

Stages never open artifact files by path. They write through `ArtifactWriter.open(name)` and read
through `Artifact.open(name)`, and the artifact's codec decides what lies on disk: the plaintext itself
(`PlainCodec`), or chunked authenticated ciphertext (`lmloom.security.encryption`). Readers are
seekable, so a shard loader can read any window without decoding the whole file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO, Protocol


class Codec(Protocol):
    """Maps an artifact file's plaintext to the bytes stored on disk and back."""

    def header(self) -> dict[str, Any] | None:
        """What a reader needs besides the key (recorded as the manifest's `encryption`); None = plain."""

    def open_write(self, path: Path, name: str) -> BinaryIO:
        """A binary file object that stores what is written to it at `path` (closing it finishes it)."""

    def open_read(self, path: Path, name: str) -> BinaryIO:
        """A seekable binary file object yielding the plaintext stored at `path`."""

    def plaintext_size(self, path: Path, name: str) -> int: ...

    def plain_path(self, path: Path) -> Path | None:
        """`path` when the bytes on disk are the plaintext (so it may be memory-mapped), else None."""


class PlainCodec:
    """Files are stored as written."""

    def header(self) -> dict[str, Any] | None:
        return None

    def open_write(self, path: Path, name: str) -> BinaryIO:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "xb")  # noqa: SIM115 - the caller closes it; "x": a name is written once

    def open_read(self, path: Path, name: str) -> BinaryIO:
        return open(path, "rb")  # noqa: SIM115

    def plaintext_size(self, path: Path, name: str) -> int:
        return path.stat().st_size

    def plain_path(self, path: Path) -> Path | None:
        return path


PLAIN = PlainCodec()


def check_name(name: str) -> str:
    """Artifact file names are relative POSIX paths that stay inside the artifact directory."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise ValueError(f"invalid artifact file name {name!r}: use a relative path like 'dir/file.bin'")
    return name


def read_all(handle: BinaryIO) -> bytes:
    with handle:
        return handle.read()


def text_reader(handle: BinaryIO) -> io.TextIOWrapper:
    return io.TextIOWrapper(handle, encoding="utf-8", newline="")


class LocalDir:
    """A plain local directory read like an artifact (`open`, `read_text`, `size`, `plain_path`),
    so format readers such as `TokenShards` accept either one."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.short_id = str(self.root)

    def has(self, name: str) -> bool:
        return (self.root / check_name(name)).is_file()

    def open(self, name: str) -> BinaryIO:
        return open(self.root / check_name(name), "rb")  # noqa: SIM115

    def read_bytes(self, name: str) -> bytes:
        return (self.root / check_name(name)).read_bytes()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def size(self, name: str) -> int:
        return (self.root / check_name(name)).stat().st_size

    def plain_path(self, name: str) -> Path | None:
        return self.root / check_name(name)
