"""The built-in corpus every machine has: the running Python's standard library and its documentation.

Code: one document per `.py` file under `sysconfig.get_paths()["stdlib"]`, never site-packages or
dist-packages, never `__pycache__`, and by default not the test suites. Prose: the pydoc topics (the
language-reference pages `help()` shows) and every module docstring. Everything is read as source text
and parsed with `ast`; no module is ever imported, because importing runs code (`antigravity` opens a
browser).

When the library is larger than `max_bytes`, items are taken in the order of a hash of their id, a stable
shuffle, so the cut keeps a representative mix of packages and docs rather than whatever sorts first.
"""

from __future__ import annotations

import ast
import hashlib
import math
import os
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.data.documents import (
    INVALID_UTF8,
    UNREADABLE_FILE,
    Document,
    Reject,
    decode_error_line,
    excerpt,
    utf8_len,
)
from lmloom.errors import DataError

SOURCE_TYPE = "python-stdlib"
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
# test/, ctypes/test/, unittest/test/, lib2to3/tests/, idlelib/idle_test/, ...
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
TOPICS_FILE = "pydoc_data/topics.py"  # a generated dict literal: its text becomes the topic documents
DEFAULT_MAX_BYTES = 20_000_000


def default_stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


class StdlibSource(StrictConfig):
    """The running Python's standard library as code documents, its documentation as prose documents."""

    type: Literal["python-stdlib"] = "python-stdlib"
    # Filled in with the real path, so the stage key (and the manifest) say which Python it came from.
    root: Path = Field(default_factory=default_stdlib_root)
    include_tests: bool = False
    docstrings: bool = True  # module docstrings as prose documents
    topics: bool = True  # pydoc topics as prose documents
    max_bytes: int | None = Field(DEFAULT_MAX_BYTES, ge=1)  # UTF-8 bytes of text taken; None: everything
    name: str = SOURCE_TYPE

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class _Item:
    """One unit the cap takes or leaves whole: a source file (with its docstring) or a pydoc topic."""

    id: str
    size: int
    path: Path | None = None
    text: str | None = None

    @property
    def order(self) -> bytes:
        return hashlib.sha256(self.id.encode("utf-8")).digest()


def read_stdlib(cfg: StdlibSource, notes: dict[str, Any] | None = None) -> Iterator[Document | Reject]:
    """Documents of the standard library in a stable hash order, at most `cfg.max_bytes` of text."""
    notes = {} if notes is None else notes
    root = cfg.root
    if not root.is_dir():
        raise DataError(f"{cfg.name} source: standard library directory {root} does not exist")
    files = list_stdlib_files(root, include_tests=cfg.include_tests)
    items = [
        _Item(rel, size, path=root / rel) for rel, size in files if not (cfg.topics and rel == TOPICS_FILE)
    ]
    if cfg.topics:
        topics, problem = read_topics(root)
        if problem:
            yield Reject(cfg.name, str(root / TOPICS_FILE), UNREADABLE_FILE, detail=problem)
        items += [_Item(f"pydoc-topic:{name}", utf8_len(text), text=text) for name, text in topics.items()]
    items.sort(key=lambda item: (item.order, item.id))
    notes.update(
        root=str(root),
        files_available=sum(1 for item in items if item.path),
        topics_available=sum(1 for item in items if item.text is not None),
        bytes_available=sum(item.size for item in items),  # code files + topics; docstrings come on top
    )

    budget = cfg.max_bytes or math.inf
    left_out = 0
    for item in items:
        if item.size > budget:
            left_out += 1
            continue
        for record in _read_item(item, cfg):
            if isinstance(record, Document):
                size = utf8_len(record.text)
                if size > budget:
                    left_out += 1
                    continue
                budget -= size
            yield record
    notes["left_out_by_cap"] = left_out


def _read_item(item: _Item, cfg: StdlibSource) -> Iterator[Document | Reject]:
    if item.text is not None:
        topic = item.id.split(":", 1)[1]
        yield Document(item.id, item.text, "prose", cfg.name, {"topic": topic})
        return
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        yield Reject(cfg.name, item.id, UNREADABLE_FILE, detail=f"{type(exc).__name__}: {exc}")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        where = f"{item.id}:{decode_error_line(data, exc)}"
        yield Reject(
            cfg.name, where, INVALID_UTF8, excerpt(data[max(0, exc.start - 40) : exc.end + 40]), str(exc)
        )
        return
    module = module_name(item.id)
    yield Document(item.id, text, "code", cfg.name, {"path": item.id, "module": module})
    if cfg.docstrings and (doc := module_docstring(text)):
        yield Document(f"{item.id}#docstring", doc, "prose", cfg.name, {"path": item.id, "module": module})


def list_stdlib_files(root: Path, include_tests: bool = False) -> list[tuple[str, int]]:
    """(relative posix path, size) of every `.py` file of the standard library, sorted by path."""
    site_dirs = {
        os.path.realpath(p) for key in ("purelib", "platlib") if (p := sysconfig.get_paths().get(key))
    }
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow directory symlinks
        dirnames[:] = [
            d
            for d in dirnames
            if d not in skip and os.path.realpath(os.path.join(dirpath, d)) not in site_dirs
        ]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and not os.path.islink(path) and os.path.isfile(path):
                found.append((Path(path).relative_to(root).as_posix(), os.path.getsize(path)))
    return sorted(found)


def read_topics(root: Path) -> tuple[dict[str, str], str | None]:
    """The pydoc topics {name: text}, read from `pydoc_data/topics.py` with ast (not imported)."""
    path = root / TOPICS_FILE
    if not path.is_file():
        return {}, None  # some distributions ship the stdlib without pydoc_data
    try:
        tree = ast.parse(path.read_bytes().decode("utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "topics" for target in node.targets
            ):
                value = ast.literal_eval(node.value)
                return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}, None
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        return {}, f"{type(exc).__name__}: {exc}"
    return {}, "no `topics = {...}` assignment found"


def module_docstring(source: str) -> str | None:
    """The module docstring of Python source text, or None (also for text that does not parse)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old test data has invalid escape sequences
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError):
            return None
    return ast.get_docstring(tree, clean=True) or None


def module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)
