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
from lmloom.data.provenance import Digest, FileRecord, Pins, SourceLedger
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
    pins: Pins = {}  # paths relative to `root`, e.g. {"os.py": <sha256>, "pydoc_data/topics.py": ...}
    digest: Digest = None

    @property
    def label(self) -> str:
        return self.name

    def pinned_files(self) -> dict[str, str]:
        return dict(self.pins)


@dataclass(frozen=True)
class _Item:
    """One unit the cap takes or leaves whole: a source file (with its docstring) or a pydoc topic."""

    id: str
    size: int
    path: Path | None = None
    text: str | None = None
    origin: FileRecord | None = None  # a topic's: the topics file's record

    @property
    def order(self) -> bytes:
        return hashlib.sha256(self.id.encode("utf-8")).digest()


def read_stdlib(
    cfg: StdlibSource, notes: dict[str, Any] | None = None, ledger: SourceLedger | None = None
) -> Iterator[Document | Reject]:
    """Documents of the standard library in a stable hash order, at most `cfg.max_bytes` of text.

    Every file read (each `.py` file the cap takes, and the topics file) is recorded in `ledger`
    with the sha256 of its bytes, and checked against the source's pins.
    """
    notes = {} if notes is None else notes
    ledger = ledger or SourceLedger.for_config(cfg)
    root = cfg.root
    if not root.is_dir():
        raise DataError(f"{cfg.name} source: standard library directory {root} does not exist")
    files = list_stdlib_files(root, include_tests=cfg.include_tests)
    ledger.expect(root, [rel for rel, _ in files])
    items = [
        _Item(rel, size, path=root / rel) for rel, size in files if not (cfg.topics and rel == TOPICS_FILE)
    ]
    if cfg.topics:
        topics, problem, origin = read_topics(root, ledger)
        if problem:
            yield Reject(cfg.name, str(root / TOPICS_FILE), UNREADABLE_FILE, detail=problem, origin=origin)
        items += [
            _Item(f"pydoc-topic:{name}", utf8_len(text), text=text, origin=origin)
            for name, text in topics.items()
        ]
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
        for record in _read_item(item, cfg, ledger):
            if isinstance(record, Document):
                size = utf8_len(record.text)
                if size > budget:
                    left_out += 1
                    continue
                budget -= size
            yield record
    notes["left_out_by_cap"] = left_out
    ledger.finish()


def _read_item(item: _Item, cfg: StdlibSource, ledger: SourceLedger) -> Iterator[Document | Reject]:
    if item.text is not None:
        topic = item.id.split(":", 1)[1]
        yield Document(item.id, item.text, "prose", cfg.name, {"topic": topic}, item.origin)
        return
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        origin = ledger.unreadable(item.path, item.id, exc)
        yield Reject(cfg.name, item.id, UNREADABLE_FILE, detail=f"{type(exc).__name__}: {exc}", origin=origin)
        return
    origin = ledger.read_bytes(item.path, item.id, data)  # refuses a pinned file with other bytes
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        where = f"{item.id}:{decode_error_line(data, exc)}"
        bad = excerpt(data[max(0, exc.start - 40) : exc.end + 40])
        yield Reject(cfg.name, where, INVALID_UTF8, bad, str(exc), origin=origin)
        return
    module = module_name(item.id)
    meta = {"path": item.id, "module": module}
    yield Document(item.id, text, "code", cfg.name, meta, origin)
    if cfg.docstrings and (doc := module_docstring(text)):
        yield Document(f"{item.id}#docstring", doc, "prose", cfg.name, dict(meta), origin)


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


def read_topics(
    root: Path, ledger: SourceLedger | None = None
) -> tuple[dict[str, str], str | None, FileRecord | None]:
    """The pydoc topics {name: text}, read from `pydoc_data/topics.py` with ast (not imported), the
    problem that kept them from being read (or None), and the file's record in `ledger`."""
    ledger = ledger or SourceLedger(SOURCE_TYPE, SOURCE_TYPE)
    path = root / TOPICS_FILE
    if not path.is_file():
        return {}, None, None  # some distributions ship the stdlib without pydoc_data
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {}, f"{type(exc).__name__}: {exc}", ledger.unreadable(path, TOPICS_FILE, exc)
    origin = ledger.read_bytes(path, TOPICS_FILE, data)  # refuses a pinned file with other bytes
    try:
        tree = ast.parse(data.decode("utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "topics" for target in node.targets
            ):
                value = ast.literal_eval(node.value)
                topics = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
                return topics, None, origin
    except (UnicodeDecodeError, SyntaxError, ValueError) as exc:
        return {}, f"{type(exc).__name__}: {exc}", origin
    return {}, "no `topics = {...}` assignment found", origin


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
