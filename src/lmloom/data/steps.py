"""Cleaning steps: each a generator over documents that keeps, rewrites or drops each one with a reason.

The contract every step follows (filters, redaction, language id, dedup, ...):

- A step is configured by a `StepConfig` subclass with a `type: Literal["name"]` field and typed,
  documented thresholds; `config.build()` returns the `Step`. Recipes list steps by `type`.
- A step implements `apply(doc) -> Document | Edit | Drop`: the document unchanged, rewritten (an
  `Edit` says why, e.g. "pii.email"), or dropped (`Drop` with a short stable reason such as
  "gopher_quality.word_count" and an optional human detail). Every drop and edit is recorded.
- `per_document = True` (the default) promises that `apply` depends on nothing but the document and
  the config: the executor may then run the step in worker processes in any order. A step that needs
  the corpus so far (dedup) sets it False and runs in the main process in input order; it may move its
  expensive pure part into `prepare(doc)`, which workers run, and receive the result in
  `apply_prepared(doc, prepared)`.

`Step.run` turns `apply` into a generator and keeps the step's `StepStats` (documents and bytes in
and out, removals by reason, seconds spent in the step itself). Steps chain lazily, so a corpus
streams through all of them one document at a time:

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

from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.data.documents import Document, Kind, utf8_len

NormalForm = Literal["NFC", "NFKC", "none"]

# C0 and C1 control characters and DEL, except \t and \n (\r is turned into \n before this applies).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class Drop:
    """What `Step.apply` returns to remove a document; the reason is counted and recorded.

    `reason` is a short stable identifier ("c4.javascript"); `detail` says what was measured
    ("3 of 40 lines mention javascript"), for the steward reading the rejects."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Edit:
    """What `Step.apply` returns for a document it rewrote, with why ("pii.email")."""

    document: Document
    reason: str
    detail: str = ""


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


OnDrop = Callable[[Document, str, Drop], None]  # (document, step name, the drop)
OnEdit = Callable[[Document, str, Edit], None]  # (the edited document, step name, the edit)


class Step:
    name: ClassVar[str]
    per_document: ClassVar[bool] = True  # see the module docstring: may run in workers, in any order

    # Document kinds the step applies to (None: all); others pass through untouched and uncounted.
    # Set from the step config's `kinds` (e.g. web-quality rules on prose, never on code).
    kinds: frozenset[str] | None = None

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def apply(self, doc: Document) -> Document | Edit | Drop:
        if not self.per_document:  # a global step that split its work into prepare + apply_prepared
            return self.apply_prepared(doc, self.prepare(doc))
        raise NotImplementedError

    def prepare(self, doc: Document) -> Any:
        """The pure, expensive part of a `per_document = False` step (e.g. a MinHash signature)."""
        return None

    def apply_prepared(self, doc: Document, prepared: Any) -> Document | Edit | Drop:
        raise NotImplementedError

    def run(
        self,
        docs: Iterable[Document],
        on_drop: OnDrop | None = None,
        on_edit: OnEdit | None = None,
    ) -> Iterator[Document]:
        return self._run(docs, self.apply, on_drop, on_edit)

    def run_prepared(
        self,
        docs: Iterable[Document],
        prepared: Any,
        on_drop: OnDrop | None = None,
        on_edit: OnEdit | None = None,
    ) -> Iterator[Document]:
        """`run` with a `prepare` result computed elsewhere (in a worker) for these documents."""
        return self._run(docs, lambda doc: self.apply_prepared(doc, prepared), on_drop, on_edit)

    def _run(
        self,
        docs: Iterable[Document],
        apply: Callable[[Document], Document | Edit | Drop],
        on_drop: OnDrop | None,
        on_edit: OnEdit | None,
    ) -> Iterator[Document]:
        stats, clock, kinds = self.stats, time.perf_counter, self.kinds
        for doc in docs:
            if kinds is not None and doc.kind not in kinds:
                yield doc
                continue
            started = clock()
            size = utf8_len(doc.text)
            result = apply(doc)
            stats.docs_in += 1
            stats.bytes_in += size
            if isinstance(result, Drop):
                stats.removed[result.reason] += 1
                stats.seconds += clock() - started
                if on_drop:
                    on_drop(doc, self.name, result)
                continue
            edit = result if isinstance(result, Edit) else None
            if edit is not None:
                result = edit.document
            if result is not doc and result.text != doc.text:
                stats.modified += 1
                size = utf8_len(result.text)
                if on_edit:
                    on_edit(result, self.name, edit or Edit(result, f"{self.name}.modified"))
            stats.docs_out += 1
            stats.bytes_out += size
            stats.seconds += clock() - started
            yield result


class StepConfig(StrictConfig):
    """Base of every step's config: a `type` literal naming the step, typed thresholds, `build()`."""

    type: str
    kinds: list[Kind] | None = Field(
        None, description="apply only to documents of these kinds (code, prose); others pass through"
    )

    def build(self) -> Step:
        raise NotImplementedError

    def build_step(self) -> Step:
        """`build()` with the settings every step shares applied."""
        step = self.build()
        step.kinds = frozenset(self.kinds) if self.kinds is not None else None
        return step


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
    per_document = False  # needs every earlier document

    def __init__(self) -> None:
        super().__init__()
        # 16 bytes of sha256 (a collision needs ~2^64 documents): ~90 bytes of memory per document
        self._seen: set[bytes] = set()

    def prepare(self, doc: Document) -> bytes:
        return content_hash(doc.text)[:16]

    def apply_prepared(self, doc: Document, prepared: bytes) -> Document | Drop:
        if prepared in self._seen:
            return Drop(self.reason)
        self._seen.add(prepared)
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
    docs: Iterable[Document],
    steps: list[Step],
    on_drop: OnDrop | None = None,
    on_edit: OnEdit | None = None,
) -> Iterator[Document]:
    for step in steps:
        docs = step.run(docs, on_drop, on_edit)
    return iter(docs)
