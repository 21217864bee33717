"""Cleaning steps: each a generator over documents that keeps, rewrites or drops each one with a reason.

A step implements `apply(doc) -> Document | Drop`; `Step.run` turns that into a generator and keeps
the step's `StepStats` (documents and bytes in and out, removals by reason, seconds spent in the step
itself). Steps chain lazily, so a corpus streams through all of them one document at a time:

    docs = source_documents
    for step in steps:
        docs = step.run(docs)
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lmloom.data.documents import Document, utf8_len

NormalForm = Literal["NFC", "NFKC", "none"]

# C0 and C1 control characters and DEL, except \t and \n (\r is turned into \n before this applies).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class Drop:
    """What `Step.apply` returns to remove a document; the reason is counted and recorded."""

    reason: str


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    modified: int = 0  # documents kept with changed text
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    removed: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "modified": self.modified,
            "removed": dict(sorted(self.removed.items())),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
        }


OnDrop = Callable[[Document, str, str], None]  # (document, step name, reason)


class Step:
    name: ClassVar[str]

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def apply(self, doc: Document) -> Document | Drop:
        raise NotImplementedError

    def run(self, docs: Iterable[Document], on_drop: OnDrop | None = None) -> Iterator[Document]:
        stats, clock = self.stats, time.perf_counter
        for doc in docs:
            started = clock()
            size = utf8_len(doc.text)
            result = self.apply(doc)
            stats.docs_in += 1
            stats.bytes_in += size
            if isinstance(result, Drop):
                stats.removed[result.reason] += 1
                stats.seconds += clock() - started
                if on_drop:
                    on_drop(doc, self.name, result.reason)
                continue
            if result is not doc and result.text != doc.text:
                stats.modified += 1
                size = utf8_len(result.text)
            stats.docs_out += 1
            stats.bytes_out += size
            stats.seconds += clock() - started
            yield result


class NormalizeUnicode(Step):
    """Unicode normal form (NFC keeps meaning; NFKC also folds compatibility forms such as ligatures)."""

    name = "normalize"

    def __init__(self, form: Literal["NFC", "NFKC"] = "NFC"):
        super().__init__()
        self.form = form

    def apply(self, doc: Document) -> Document:
        if unicodedata.is_normalized(self.form, doc.text):
            return doc
        return doc.with_text(unicodedata.normalize(self.form, doc.text))


class StripControlChars(Step):
    """Line endings to \\n, then every control character except \\n and \\t removed."""

    name = "control_chars"

    def apply(self, doc: Document) -> Document:
        text = doc.text
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if _CONTROL.search(text):
            text = _CONTROL.sub("", text)
        return doc.with_text(text)


class MinChars(Step):
    """Drops documents with fewer than `min_chars` characters once surrounding whitespace is ignored."""

    name = "min_chars"
    reason = "short"

    def __init__(self, min_chars: int):
        super().__init__()
        self.min_chars = min_chars

    def apply(self, doc: Document) -> Document | Drop:
        return Drop(self.reason) if len(doc.text.strip()) < self.min_chars else doc


class ExactDedup(Step):
    """Keeps the first document of each exact text (sha256 of the text as normalised by earlier steps)."""

    name = "dedup"
    reason = "duplicate"

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[bytes] = set()  # 32-byte digests: ~100 bytes of memory per distinct document

    def apply(self, doc: Document) -> Document | Drop:
        digest = content_hash(doc.text)
        if digest in self._seen:
            return Drop(self.reason)
        self._seen.add(digest)
        return doc


def content_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def build_steps(normalize: NormalForm = "NFC", min_chars: int = 0, dedup: bool = True) -> list[Step]:
    """The cleaning chain in its fixed order: normalise, strip controls, drop short, drop duplicates."""
    steps: list[Step] = []
    if normalize != "none":
        steps.append(NormalizeUnicode(normalize))
    steps.append(StripControlChars())
    if min_chars > 0:
        steps.append(MinChars(min_chars))
    if dedup:
        steps.append(ExactDedup())
    return steps


def run_steps(
    docs: Iterable[Document], steps: list[Step], on_drop: OnDrop | None = None
) -> Iterator[Document]:
    for step in steps:
        docs = step.run(docs, on_drop)
    return iter(docs)
