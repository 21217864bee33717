"""Corpus-wide deduplication steps beyond exact matches: near-duplicate documents and repeated paragraphs.

- `near_dedup` drops a document whose MinHash signature collides in an LSH band with an earlier kept
  document and (with verification, the default) whose estimated Jaccard with it reaches the threshold.
  The signature is the pure, expensive part (`prepare`, run by workers); the index lookup runs here,
  in input order, so the first document of a near-duplicate group is the one kept.
- `paragraph_dedup` removes paragraphs (blank-line separated, at least `min_paragraph_chars` once
  whitespace is collapsed) already seen in an earlier document, and drops a document left with no
  such paragraph. Short paragraphs ("Thanks!", "}") are never removed: they repeat by nature.

Both keep their memory in numpy arrays (see `lmloom.data.minhash`), not in Python objects per entry.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from lmloom.data.documents import Document
from lmloom.data.minhash import LSHIndex, MinHasher, ShingleConfig, UInt64Map, choose_bands_rows
from lmloom.data.steps import Drop, Edit, Step, StepConfig

NEAR_DUPLICATE = "near_dedup.duplicate"
PARAGRAPHS_REMOVED = "paragraph_dedup.removed"
ALL_PARAGRAPHS_SEEN = "paragraph_dedup.duplicate"

# A paragraph break: a newline, optional blank-ish whitespace, another newline, and any trailing spaces.
_PARAGRAPH_BREAK = re.compile(r"(\n[ \t\f\v]*\n\s*)")


class NearDedupConfig(StepConfig):
    """Drop near-duplicate documents (MinHash + LSH over the whole corpus; the first one is kept)."""

    type: Literal["near_dedup"] = "near_dedup"
    shingle: Literal["word", "char"] = Field("word", description="shingle unit: words or characters")
    shingle_size: int = Field(5, ge=1, le=64, description="units per shingle (5 words; ~5-9 characters)")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations (signature length)")
    threshold: float = Field(
        0.7, gt=0.0, le=1.0, description="estimated Jaccard at or above which a document is a duplicate"
    )
    bands: int | None = Field(None, ge=1, description="LSH bands; with rows, or both unset to derive them")
    rows: int | None = Field(None, ge=1, description="signature values per band")
    verify: bool = Field(
        True,
        description="confirm band collisions by estimated Jaccard (stores 2*num_perm bytes per kept doc)",
    )
    seed: int = Field(
        1, description="seed of the hash functions; signatures are comparable only at equal seeds"
    )
    lowercase: bool = Field(True, description="lowercase before shingling")
    normalize_whitespace: bool = Field(
        True, description="collapse whitespace runs to one space before char shingling (words always are)"
    )

    @model_validator(mode="after")
    def _bands_and_rows(self) -> NearDedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither to derive them from threshold")
        if self.bands is not None and self.rows is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self

    def bands_rows(self) -> tuple[int, int]:
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        # Verification removes false positives for one signature comparison each, so a missed
        # duplicate is the costlier error: weighting misses 9:1 puts P(collision) at the threshold at
        # ~0.9 and ~0.99 at 0.1 above it, instead of ~0.5 and ~0.87 with equal weights.
        fn_weight = 0.9 if self.verify else 0.5
        return choose_bands_rows(self.threshold, self.num_perm, 1.0 - fn_weight, fn_weight)

    def build(self) -> NearDedup:
        return NearDedup(self)


class NearDedup(Step):
    name = "near_dedup"
    per_document = False

    def __init__(self, config: NearDedupConfig):
        super().__init__()
        self.config = config
        shingles = ShingleConfig(
            config.shingle, config.shingle_size, config.lowercase, config.normalize_whitespace
        )
        self.hasher = MinHasher(config.num_perm, shingles, config.seed)
        bands, rows = config.bands_rows()
        threshold = config.threshold if config.verify else None
        self.index = LSHIndex(config.num_perm, bands, rows, threshold, config.seed)

    def prepare(self, doc: Document) -> tuple[np.ndarray, np.ndarray] | None:
        """(signature uint32[num_perm], LSH band keys uint64[bands]): all the hashing, none of the
        index; None when the document has no words to shingle."""
        signature = self.hasher.signature(doc.text)
        return None if signature is None else (signature, self.index.band_keys(signature))

    def apply(self, doc: Document) -> Document | Drop:
        return self.apply_prepared(doc, self.prepare(doc))

    def apply_prepared(
        self, doc: Document, prepared: tuple[np.ndarray, np.ndarray] | None
    ) -> Document | Drop:
        if prepared is None:  # empty or whitespace only: nothing to compare (exact dedup covers it)
            return doc
        match = self.index.add(doc.id, *prepared)
        if match is None:
            return doc
        if match.jaccard is None:
            return Drop(NEAR_DUPLICATE, f"shares an LSH band with {match.key} (not verified)")
        return Drop(NEAR_DUPLICATE, f"near-duplicate of {match.key} (estimated Jaccard {match.jaccard:.2f})")


class ParagraphDedupConfig(StepConfig):
    """Remove paragraphs already seen in earlier documents; drop documents left with none."""

    type: Literal["paragraph_dedup"] = "paragraph_dedup"
    min_paragraph_chars: int = Field(
        80, ge=1, description="shorter paragraphs (whitespace collapsed) are neither removed nor counted"
    )
    lowercase: bool = Field(False, description="compare paragraphs case-insensitively")

    def build(self) -> ParagraphDedup:
        return ParagraphDedup(self.min_paragraph_chars, self.lowercase)


def split_paragraphs(text: str) -> list[str]:
    """[paragraph, break, paragraph, break, ..., paragraph]: joining gives the text back exactly."""
    return _PARAGRAPH_BREAK.split(text)


class ParagraphDedup(Step):
    """Paragraph digests are 8 bytes (blake2b) in a numpy hash table: ~24-48 bytes per distinct one."""

    name = "paragraph_dedup"
    per_document = False

    def __init__(self, min_paragraph_chars: int = 80, lowercase: bool = False):
        super().__init__()
        self.min_paragraph_chars = min_paragraph_chars
        self.lowercase = lowercase
        self._seen = UInt64Map()

    def prepare(self, doc: Document) -> np.ndarray:
        """One digest per paragraph of `split_paragraphs(doc.text)`; 0 for a short one (never removed)."""
        paragraphs = split_paragraphs(doc.text)[::2]
        digests = np.zeros(len(paragraphs), dtype=np.uint64)
        for i, paragraph in enumerate(paragraphs):
            normalized = " ".join(paragraph.split())
            if len(normalized) < self.min_paragraph_chars:
                continue
            if self.lowercase:
                normalized = normalized.lower()
            digest = hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            digests[i] = int.from_bytes(digest, "little") or 1  # 0 means "short" here, empty in the table
        return digests

    def apply(self, doc: Document) -> Document | Edit | Drop:
        return self.apply_prepared(doc, self.prepare(doc))

    def apply_prepared(self, doc: Document, prepared: np.ndarray) -> Document | Edit | Drop:
        substantive = prepared != 0
        if not substantive.any():
            return doc
        digests = prepared[substantive]
        _, seen = self._seen.get_many(digests)
        repeated = np.zeros(len(prepared), dtype=bool)
        repeated[substantive] = seen
        # Only earlier documents count: a paragraph repeated inside this one is kept, and recorded once.
        self._seen.insert_many(np.unique(digests[~seen]), 0)
        removed = int(np.count_nonzero(repeated))
        if removed == 0:
            return doc
        if removed == int(np.count_nonzero(substantive)):
            return Drop(
                ALL_PARAGRAPHS_SEEN, f"all {removed} substantive paragraphs seen in earlier documents"
            )
        text = _without(split_paragraphs(doc.text), repeated)
        return Edit(
            doc.with_text(text), PARAGRAPHS_REMOVED, f"{removed} paragraphs seen in earlier documents"
        )


def _without(pieces: list[str], remove: np.ndarray) -> str:
    """Rejoin paragraphs and the breaks between them, leaving out the removed ones and one break each."""
    kept: list[str] = []
    pending_break = ""
    for i, paragraph in enumerate(pieces[::2]):
        if remove[i]:
            continue
        if kept:
            kept.append(pending_break)
        kept.append(paragraph)
        # The break after a kept paragraph is the one that separates it from the next kept paragraph.
        pending_break = pieces[2 * i + 1] if 2 * i + 1 < len(pieces) else ""
    return "".join(kept)
