"""The `safety` step: drop documents dense in harmful content, by word list and optionally by classifier.

Word lists ship as package data, one UTF-8 file per category in `lmloom/data/wordlists/<category>.txt`
(a term or phrase a line, `#` comments). Users add terms or whole new categories with `extra_lists`,
switch categories off with `disabled`, and exempt phrases with `allowlist` ("sex education",
"breast cancer"...).

All terms of all categories go into one case-insensitive, whole-word regex, longest first, so a
document is scanned once; allowlisted phrases are alternatives of the same regex and win ties, so the
blocked word inside "sex education" is consumed by the allowed phrase and never counted.

A category drops a document when its matches reach both `min_count` and `max_per_1000_words`: one
mention of "heroin" in a long history essay stays, a short spam page repeating it goes. The drop
reason is "safety.<category>" (the densest category over threshold) and the detail gives the counts.

The optional classifier (`classifier: "package.module:callable"`, called as `callable(text) ->
{category: score}`) is loaded with importlib when the step is built; a document is dropped when any
score reaches `classifier_threshold`, with reason "safety.<category>".
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from lmloom.config import StrictConfig
from lmloom.data.documents import Document
from lmloom.data.steps import Drop, Step, StepConfig
from lmloom.errors import ConfigError

Classifier = Callable[[str], Mapping[str, float]]

WORDLIST_PACKAGE = "lmloom.data"
WORDLIST_DIR = "wordlists"
_ALLOW = ""  # the category of allowlisted phrases: matched, never counted
_CATEGORY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_WORD = re.compile(r"\w+")
_CLASSIFIER_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def builtin_categories() -> list[str]:
    folder = resources.files(WORDLIST_PACKAGE).joinpath(WORDLIST_DIR)
    return sorted(entry.name[:-4] for entry in folder.iterdir() if entry.name.endswith(".txt"))


def read_terms(text: str) -> list[str]:
    """The terms of a word-list file: one a line, blank lines and `#` comments skipped."""
    terms = []
    for line in text.splitlines():
        term = " ".join(line.split())
        if term and not term.startswith("#"):
            terms.append(term)
    return terms


def builtin_terms(category: str) -> list[str]:
    entry = resources.files(WORDLIST_PACKAGE).joinpath(WORDLIST_DIR, f"{category}.txt")
    return read_terms(entry.read_text(encoding="utf-8"))


def _normalise(term: str) -> str:
    return " ".join(term.lower().split())


def compile_terms(terms: Iterable[str]) -> re.Pattern[str]:
    """One whole-word, case-insensitive regex; any run of whitespace matches a space in a phrase."""
    ordered = sorted(set(terms), key=lambda term: (-len(term), term))
    alternatives = "|".join(r"\s+".join(re.escape(word) for word in term.split()) for term in ordered)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class WordListMatcher:
    """Counts, per category, the whole-word matches of its terms in a text."""

    def __init__(self, terms_by_category: Mapping[str, Iterable[str]], allowlist: Iterable[str] = ()):
        self.category_of: dict[str, str] = {}
        for category, terms in terms_by_category.items():
            for term in terms:
                self.category_of.setdefault(_normalise(term), category)
        for phrase in allowlist:  # an allowed phrase overrides the same phrase in a category
            self.category_of[_normalise(phrase)] = _ALLOW
        self.pattern = compile_terms(self.category_of) if self.category_of else None
        # Prefilter: a match starts with its term's first word as a whole word, so a text holding
        # none of those words cannot match, and the big alternation (slow: it is tried at every
        # position) runs only on the few texts that might. Terms without a word character opt out.
        firsts = [_WORD.findall(term) for term in self.category_of]
        self.first_words = frozenset(words[0] for words in firsts if words)
        self.always_scan = any(not words for words in firsts)

    def count(self, text: str) -> Counter[str]:
        counts: Counter[str] = Counter()
        if self.pattern is None:
            return counts
        if not self.always_scan and self.first_words.isdisjoint(_WORD.findall(text.lower())):
            return counts
        for match in self.pattern.finditer(text):
            category = self.category_of[_normalise(match.group())]
            if category != _ALLOW:
                counts[category] += 1
        return counts


def load_classifier(spec: str) -> Classifier:
    """Import "package.module:callable" (the callable may be a dotted attribute path)."""
    if not _CLASSIFIER_SPEC.match(spec):
        raise ConfigError(f"safety.classifier = {spec!r}: expected 'package.module:callable'")
    module_name, attribute = spec.split(":")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"safety.classifier = {spec!r}: cannot import module {module_name!r} ({exc})"
        ) from exc
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise ConfigError(
                f"safety.classifier = {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        target = getattr(target, name)
    if not callable(target):
        raise ConfigError(f"safety.classifier = {spec!r}: {attribute!r} is not callable")
    return target  # type: ignore[return-value]


class CategoryThreshold(StrictConfig):
    min_count: int = Field(3, ge=1, description="drop only with at least this many matches")
    max_per_1000_words: float = Field(
        5.0, ge=0.0, description="drop only when matches per 1,000 words reach this rate"
    )


class SafetyConfig(StepConfig):
    """Drop documents dense in sexual, violent, hateful, self-harm, weapons or drugs content."""

    type: Literal["safety"] = "safety"
    disabled: list[str] = Field(default_factory=list, description="built-in categories not checked")
    extra_lists: dict[str, list[Path]] = Field(
        default_factory=dict,
        description="category -> extra word-list files (UTF-8, a term a line); a new name adds a category",
    )
    allowlist: list[str] = Field(
        default_factory=list, description="phrases never counted, e.g. 'sex education', 'breast cancer'"
    )
    allowlist_files: list[Path] = Field(default_factory=list, description="files of allowlisted phrases")
    default_threshold: CategoryThreshold = CategoryThreshold()
    thresholds: dict[str, CategoryThreshold] = Field(
        default_factory=dict, description="per-category thresholds overriding default_threshold"
    )
    classifier: str | None = Field(
        None, description="'package.module:callable' returning {category: score} for a text"
    )
    classifier_threshold: float = Field(0.5, ge=0.0, le=1.0, description="drop when any score reaches it")

    @field_validator("disabled", "thresholds", "extra_lists")
    @classmethod
    def _category_names(cls, value: list[str] | dict[str, object]) -> list[str] | dict[str, object]:
        bad = [name for name in value if not _CATEGORY_NAME.match(name)]
        if bad:
            raise ValueError(f"category names are lower-case identifiers, got {bad}")
        return value

    @field_validator("classifier")
    @classmethod
    def _classifier_spec(cls, spec: str | None) -> str | None:
        if spec is not None and not _CLASSIFIER_SPEC.match(spec):
            raise ValueError("expected 'package.module:callable'")
        return spec

    def build(self) -> SafetyFilter:
        builtin = builtin_categories()
        unknown = sorted(set(self.disabled) - set(builtin) - set(self.extra_lists))
        if unknown:
            raise ConfigError(
                f"safety.disabled: unknown categories {unknown}; built-in: {', '.join(builtin)}"
            )
        terms: dict[str, list[str]] = {
            category: builtin_terms(category) for category in builtin if category not in self.disabled
        }
        for category, paths in self.extra_lists.items():
            if category in self.disabled:
                continue
            for path in paths:
                terms.setdefault(category, []).extend(read_terms(_read_list(path, f"extra_lists.{category}")))
        allowlist = list(self.allowlist)
        for path in self.allowlist_files:
            allowlist.extend(read_terms(_read_list(path, "allowlist_files")))
        thresholds = {category: self.thresholds.get(category, self.default_threshold) for category in terms}
        classifier = load_classifier(self.classifier) if self.classifier else None
        return SafetyFilter(
            WordListMatcher(terms, allowlist), thresholds, classifier, self.classifier_threshold
        )


def _read_list(path: Path, key: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"safety.{key}: cannot read word list {str(path)!r} ({exc})") from exc


class SafetyFilter(Step):
    """Drops a document whose word-list matches or classifier scores cross a category's threshold."""

    name = "safety"

    def __init__(
        self,
        matcher: WordListMatcher,
        thresholds: Mapping[str, CategoryThreshold],
        classifier: Classifier | None = None,
        classifier_threshold: float = 0.5,
    ):
        super().__init__()
        self.matcher = matcher
        self.thresholds = dict(thresholds)
        self.classifier = classifier
        self.classifier_threshold = classifier_threshold

    def apply(self, doc: Document) -> Document | Drop:
        counts = self.matcher.count(doc.text)
        if counts:
            words = max(len(doc.text.split()), 1)
            rates = {category: count * 1000 / words for category, count in counts.items()}
            over = [
                category
                for category, count in counts.items()
                if count >= self.thresholds[category].min_count
                and rates[category] >= self.thresholds[category].max_per_1000_words
            ]
            if over:
                worst = max(over, key=lambda category: (rates[category], category))
                detail = ", ".join(
                    f"{category} {counts[category]} ({rates[category]:.1f} per 1000 words)"
                    for category in sorted(counts)
                )
                return Drop(f"safety.{worst}", f"{detail}; {words} words")
        if self.classifier is not None:
            scores = self._scores(doc.text)
            over_scores = {c: s for c, s in scores.items() if s >= self.classifier_threshold}
            if over_scores:
                worst = max(over_scores, key=lambda category: (over_scores[category], category))
                return Drop(
                    f"safety.{worst}",
                    f"classifier score {over_scores[worst]:.3f} >= {self.classifier_threshold}",
                )
        return doc

    def _scores(self, text: str) -> dict[str, float]:
        assert self.classifier is not None
        scores = self.classifier(text)
        if not isinstance(scores, Mapping) or not all(
            isinstance(category, str) and isinstance(score, int | float) for category, score in scores.items()
        ):
            raise ConfigError(
                f"safety.classifier returned {type(scores).__name__}, expected dict[str, float]"
            )
        return {category: float(score) for category, score in scores.items()}
