"""A train/validation split by content hash: a document's split depends on its own text only, never on
the order it arrives in or on the other documents, so growing a corpus never moves a document between
splits and identical texts always land together (no leak of a training text into validation).

A document goes to validation when the first 8 bytes of sha256(text), read as a fraction of 2**64, are
below `val_fraction`. One exception keeps small corpora usable: with two or more documents and a
`val_fraction` above zero, neither split may end up empty. The train document nearest the threshold
and the validation document farthest from it are held back until the end, so either can move over;
which one moves still depends only on the hashes, not on the order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from lmloom.data.documents import Document, utf8_len
from lmloom.data.steps import content_hash

Split = Literal["train", "val"]
_SCALE = float(1 << 64)


def val_score(text: str) -> float:
    """A uniform number in [0, 1) fixed by the text alone."""
    return int.from_bytes(content_hash(text)[:8], "big") / _SCALE


def split_of(text: str, val_fraction: float) -> Split:
    return "val" if val_score(text) < val_fraction else "train"


class SplitWriter:
    """Streams documents to a train and a validation sink, holding back at most two of them."""

    def __init__(self, sinks: dict[Split, Callable[[Document], None]], val_fraction: float):
        self.sinks = sinks
        self.val_fraction = val_fraction
        self.docs: dict[Split, int] = {"train": 0, "val": 0}
        self.bytes: dict[Split, int] = {"train": 0, "val": 0}
        self.kinds: dict[Split, dict[str, int]] = {"train": {}, "val": {}}
        # (score, id, document): the train doc with the lowest score, the val doc with the highest
        self._held: dict[Split, tuple[float, str, Document] | None] = {"train": None, "val": None}

    @property
    def written(self) -> int:
        return self.docs["train"] + self.docs["val"]

    def add(self, doc: Document) -> Split:
        score = val_score(doc.text)
        split: Split = "val" if score < self.val_fraction else "train"
        entry = (score, doc.id, doc)
        held = self._held[split]
        if held is None or (entry[:2] < held[:2] if split == "train" else entry[:2] > held[:2]):
            self._held[split] = entry
            if held is not None:
                self._emit(split, held[2])
        else:
            self._emit(split, doc)
        return split

    def finish(self) -> None:
        """Write the held-back documents, moving one over if a split would otherwise be empty."""
        train, val = self._held["train"], self._held["val"]
        total = sum(self.docs.values()) + (train is not None) + (val is not None)
        if self.val_fraction > 0 and total >= 2:
            if val is None and self.docs["val"] == 0:
                train, val = None, train
            elif train is None and self.docs["train"] == 0:
                train, val = val, None
        self._held = {"train": None, "val": None}
        for split, entry in (("train", train), ("val", val)):
            if entry is not None:
                self._emit(split, entry[2])

    def _emit(self, split: Split, doc: Document) -> None:
        self.sinks[split](doc)
        self.docs[split] += 1
        self.bytes[split] += utf8_len(doc.text)
        kinds = self.kinds[split]
        kinds[doc.kind] = kinds.get(doc.kind, 0) + 1
