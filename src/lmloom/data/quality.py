"""Heuristic quality filters: the published Gopher, C4 and FineWeb rules as cleaning steps.

Four steps, each configured by its `StepConfig` (defaults are the published thresholds, as datatrove
applies them), each a pure function of the document (`per_document = True`):

- `gopher_quality` (Rae et al. 2021, "MassiveText" rules): word count, mean word length, "#" and
  ellipsis per word, bullet and ellipsis lines, words with a letter, stop words;
- `gopher_repetition` (same paper, table A1): duplicate lines and paragraphs, the most frequent 2-4-gram,
  duplicated 5-10-grams, each as a fraction of the document's characters;
- `c4` (Raffel et al. 2020): keeps only lines that end in terminal punctuation and have enough words,
  removes lines about javascript or cookie/terms policies, drops pages with "lorem ipsum", a curly
  bracket or too few sentences. It is the one step that edits: it returns the page with only its kept
  lines (an `Edit`, reason "c4.lines_removed"), or drops it. Unlike the reference it keeps paragraph
  breaks (one blank line) between kept lines;
- `fineweb` (Penedo et al. 2024): lines ending in punctuation, short lines, duplicated line characters,
  newlines per word.

Rules are checked in the order of the reference implementation and the first failing one names the
drop ("gopher_repetition.dup_line_frac", "c4.lorem_ipsum", ...), with the measured value in `detail`.
Words are split by `lmloom.data.words`, which follows spaCy's English tokenizer (what datatrove uses)
at a fraction of its cost; the statistics of a step are computed once per document and shared by its
rules, and the split is shared by the steps of a chain.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from itertools import accumulate, compress, repeat
from operator import add, gt, ne
from typing import Literal

from pydantic import Field, field_validator

from lmloom.data.documents import Document
from lmloom.data.steps import Drop, Edit, Step, StepConfig
from lmloom.data.words import (
    ALPHA,
    SENTENCE_END,
    SYMBOL,
    content_length,
    count_sentences,
    word_shape,
    words_of,
)

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _duplicates(items: list[str]) -> tuple[int, int]:
    """How many items repeat an earlier one, and how many characters those repeats hold."""
    unique = set(items)
    return len(items) - len(unique), sum(map(len, items)) - sum(map(len, unique))


# --------------------------------------------------------------------------------------- gopher_quality

_BULLET_LINE = re.compile(r"^[^\S\n]*[•\-]", re.MULTILINE)
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)[^\S\n]*$", re.MULTILINE)


class GopherQualityConfig(StepConfig):
    """Gopher's document quality rules; set a threshold to null to switch its rule off."""

    type: Literal["gopher_quality"] = "gopher_quality"
    min_doc_words: int | None = Field(
        50, ge=0, description="fewest words (punctuation-only tokens not counted)"
    )
    max_doc_words: int | None = Field(100_000, ge=0, description="most words")
    min_avg_word_length: float | None = Field(3, ge=0, description="shortest mean word length, in characters")
    max_avg_word_length: float | None = Field(10, ge=0, description="longest mean word length, in characters")
    max_symbol_word_ratio: float | None = Field(
        0.1, ge=0, description='most "#", and separately most ellipses, per word'
    )
    max_bullet_lines_ratio: float | None = Field(
        0.9, ge=0, le=1, description='largest fraction of lines starting with a bullet ("•" or "-")'
    )
    max_ellipsis_lines_ratio: float | None = Field(
        0.3, ge=0, le=1, description='largest fraction of lines ending with an ellipsis ("..." or "…")'
    )
    min_alpha_words_ratio: float | None = Field(
        0.8, ge=0, le=1, description="smallest fraction of words holding at least one letter"
    )
    min_stop_words: int | None = Field(2, ge=0, description="fewest distinct stop words the text must use")
    stop_words: list[str] = Field(
        default_factory=lambda: list(GOPHER_STOP_WORDS),
        description="the stop words (matched case-sensitively)",
    )

    def build(self) -> GopherQuality:
        return GopherQuality(self)


class GopherQuality(Step):
    name = "gopher_quality"

    def __init__(self, config: GopherQualityConfig | None = None):
        super().__init__()
        self.config = config or GopherQualityConfig()
        self.stop_words = frozenset(self.config.stop_words)

    def apply(self, doc: Document) -> Document | Drop:
        cfg, text = self.config, doc.text
        words = words_of(text)
        n_tokens = len(words)
        shapes = list(map(word_shape, words))
        n_words = n_tokens - shapes.count(SYMBOL)  # punctuation-only tokens are not words

        if cfg.min_doc_words is not None and n_words < cfg.min_doc_words:
            return Drop("gopher_quality.word_count", f"{n_words} words < {cfg.min_doc_words}")
        if cfg.max_doc_words is not None and n_words > cfg.max_doc_words:
            return Drop("gopher_quality.word_count", f"{n_words} words > {cfg.max_doc_words}")
        if n_words == 0:
            return Drop("gopher_quality.word_count", "no words")

        mean_length = sum(map(content_length, words)) / n_words
        if cfg.min_avg_word_length is not None and mean_length < cfg.min_avg_word_length:
            return Drop(
                "gopher_quality.mean_word_length",
                f"mean word length {mean_length:.2f} < {cfg.min_avg_word_length}",
            )
        if cfg.max_avg_word_length is not None and mean_length > cfg.max_avg_word_length:
            return Drop(
                "gopher_quality.mean_word_length",
                f"mean word length {mean_length:.2f} > {cfg.max_avg_word_length}",
            )

        if cfg.max_symbol_word_ratio is not None:
            hashes = text.count("#") / n_tokens
            if hashes > cfg.max_symbol_word_ratio:
                return Drop(
                    "gopher_quality.hash_ratio", f"{hashes:.3f} '#' per word > {cfg.max_symbol_word_ratio}"
                )
            ellipses = (text.count("...") + text.count("…")) / n_tokens
            if ellipses > cfg.max_symbol_word_ratio:
                return Drop(
                    "gopher_quality.ellipsis_ratio",
                    f"{ellipses:.3f} ellipses per word > {cfg.max_symbol_word_ratio}",
                )

        n_lines = len(text.splitlines())
        if cfg.max_bullet_lines_ratio is not None:
            bullets = _ratio(len(_BULLET_LINE.findall(text)), n_lines)
            if bullets > cfg.max_bullet_lines_ratio:
                return Drop(
                    "gopher_quality.bullet_lines",
                    f"{bullets:.3f} of lines start with a bullet > {cfg.max_bullet_lines_ratio}",
                )
        if cfg.max_ellipsis_lines_ratio is not None:
            trailing = _ratio(len(_ELLIPSIS_LINE.findall(text)), n_lines)
            if trailing > cfg.max_ellipsis_lines_ratio:
                return Drop(
                    "gopher_quality.ellipsis_lines",
                    f"{trailing:.3f} of lines end with an ellipsis > {cfg.max_ellipsis_lines_ratio}",
                )

        if cfg.min_alpha_words_ratio is not None:
            alpha = shapes.count(ALPHA) / n_tokens
            if alpha < cfg.min_alpha_words_ratio:
                return Drop(
                    "gopher_quality.alpha_words",
                    f"{alpha:.3f} of words hold a letter < {cfg.min_alpha_words_ratio}",
                )

        if cfg.min_stop_words is not None:
            found = len(self.stop_words.intersection(words))
            if found < cfg.min_stop_words:
                return Drop(
                    "gopher_quality.stop_words", f"{found} distinct stop words < {cfg.min_stop_words}"
                )
        return doc


# ------------------------------------------------------------------------------------ gopher_repetition

_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAKS = re.compile(r"\n+")


class GopherRepetitionConfig(StepConfig):
    """Gopher's repetition rules: each a fraction that must not be exceeded; null switches one off."""

    type: Literal["gopher_repetition"] = "gopher_repetition"
    dup_line_frac: float | None = Field(0.3, ge=0, le=1, description="lines that repeat an earlier line")
    dup_para_frac: float | None = Field(0.3, ge=0, le=1, description="paragraphs that repeat an earlier one")
    dup_line_char_frac: float | None = Field(0.2, ge=0, le=1, description="characters in repeated lines")
    dup_para_char_frac: float | None = Field(0.2, ge=0, le=1, description="characters in repeated paragraphs")
    top_n_grams: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> largest share of the characters the most frequent n-gram may cover",
    )
    dup_n_grams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> largest share of the characters that repeated n-grams may cover",
    )

    @field_validator("top_n_grams", "dup_n_grams")
    @classmethod
    def _n_at_least_two(cls, limits: dict[int, float]) -> dict[int, float]:
        if any(n < 2 for n in limits):
            raise ValueError("n-gram sizes start at 2")
        return limits

    def build(self) -> GopherRepetition:
        return GopherRepetition(self)


class GopherRepetition(Step):
    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig | None = None):
        super().__init__()
        self.config = config or GopherRepetitionConfig()
        self.top_n_grams = dict(self.config.top_n_grams)
        self.dup_n_grams = dict(self.config.dup_n_grams)
        self.longest_n = max([*self.top_n_grams, *self.dup_n_grams], default=0)
        self.longest_top_n = max(self.top_n_grams, default=0)
        self.first_dup_n = min(self.dup_n_grams, default=0)
        self.smallest_dup_frac = min(self.dup_n_grams.values(), default=0.0)

    def apply(self, doc: Document) -> Document | Drop:
        cfg, text = self.config, doc.text
        size = len(text)
        if not text:
            return Drop("gopher_repetition.empty", "no text")

        paragraphs = _PARAGRAPH_BREAK.split(text.strip())
        repeats, chars = _duplicates(paragraphs)
        if cfg.dup_para_frac is not None and repeats / len(paragraphs) > cfg.dup_para_frac:
            return Drop(
                "gopher_repetition.dup_para_frac",
                f"{repeats} of {len(paragraphs)} paragraphs repeat > {cfg.dup_para_frac}",
            )
        if cfg.dup_para_char_frac is not None and chars / size > cfg.dup_para_char_frac:
            return Drop(
                "gopher_repetition.dup_para_char_frac",
                f"{chars / size:.3f} of characters in repeated paragraphs > {cfg.dup_para_char_frac}",
            )

        lines = _LINE_BREAKS.split(text)
        repeats, chars = _duplicates(lines)
        if cfg.dup_line_frac is not None and repeats / len(lines) > cfg.dup_line_frac:
            return Drop(
                "gopher_repetition.dup_line_frac",
                f"{repeats} of {len(lines)} lines repeat > {cfg.dup_line_frac}",
            )
        if cfg.dup_line_char_frac is not None and chars / size > cfg.dup_line_char_frac:
            return Drop(
                "gopher_repetition.dup_line_char_frac",
                f"{chars / size:.3f} of characters in repeated lines > {cfg.dup_line_char_frac}",
            )

        return self._check_n_grams(words_of(text), size) or doc

    def _check_n_grams(self, words: list[str], size: int) -> Drop | None:
        """The n-gram rules, n = 2, 3, ... in turn, on equivalence classes of positions.

        Two n-grams are equal when their (n-1)-word prefixes are equal and their last words are, so
        each level is computed from the previous one with small integer pairs, and only at positions
        whose (n-1)-gram occurs more than once: an n-gram seen once can't grow into a repeated one.
        For prose that set shrinks to almost nothing after a few levels."""
        n_words = len(words)
        starts = list(accumulate(map(len, words), initial=0))  # characters before each word
        word_class = list(map({}.setdefault, words, range(n_words)))  # first position of each word
        counts = Counter(word_class)
        live = list(compress(range(n_words), map(gt, map(counts.__getitem__, word_class), repeat(1))))
        class_of = word_class.__getitem__  # position -> class of the (n-1)-gram there, for live positions
        # Every step below runs in C (map, zip, compress, Counter); Python only loops per level.
        for n in range(2, self.longest_n + 1):
            last = n_words - n  # the last position an n-gram starts at
            if last < 0:
                break  # shorter than n words: no n-gram, nothing to measure
            while live and live[-1] > last:
                live.pop()
            # An n-gram's class: the first position holding the same (n-1)-gram class and last word.
            keys = zip(
                map(class_of, live), map(word_class.__getitem__, map(add, live, repeat(n - 1))), strict=True
            )
            classes = list(map({}.setdefault, keys, live))
            # A class is repeated when some position other than its first one holds it.
            repeated = set(compress(classes, map(ne, classes, live)))
            if repeated:
                keep = list(map(repeated.__contains__, classes))
                live, classes = list(compress(live, keep)), list(compress(classes, keep))
            else:
                live, classes = [], []

            limit = self.top_n_grams.get(n)
            if limit is not None:
                best, count = _most_frequent(live, classes)
                share = (starts[best + n] - starts[best] + n - 1) * count / size
                if share > limit:
                    gram = " ".join(words[best : best + n])
                    return Drop(
                        f"gopher_repetition.top_{n}_gram_char_frac",
                        f"{gram!r} x{count} covers {share:.3f} > {limit}",
                    )
            if n == self.first_dup_n and live and n >= self.longest_top_n:
                # Every repeat of a longer n-gram starts where this shorter one repeats: when the
                # words within reach of those places are too few to break any duplicate rule, none
                # of the remaining levels has to be computed.
                if (
                    _covered_chars(compress(live, map(ne, classes, live)), self.longest_n, starts)
                    <= self.smallest_dup_frac * size
                ):
                    return None
            limit = self.dup_n_grams.get(n)
            if limit is not None and live:
                share = _repeated_gram_chars(live, classes, n, starts) / size
                if share > limit:
                    return Drop(
                        f"gopher_repetition.dup_{n}_gram_char_frac",
                        f"{share:.3f} of characters in repeated {n}-grams > {limit}",
                    )
            class_of = dict(zip(live, classes, strict=True)).__getitem__
        return None


def _most_frequent(positions: list[int], classes: list[int]) -> tuple[int, int]:
    """The most frequent n-gram (its first position) and its count; on a tie, the one seen first."""
    if not classes:
        return 0, 1  # every n-gram occurs once: the first one
    counts = Counter(compress(classes, map(ne, classes, positions)))  # occurrences after the first
    top = max(counts.values())
    return min(gram for gram, count in counts.items() if count == top), top + 1


def _covered_chars(positions: Iterable[int], width: int, starts: list[int]) -> int:
    """Characters of the words within `width` words from any of `positions` (sorted)."""
    total, covered_to, n_words = 0, 0, len(starts) - 1
    for position in positions:
        end = min(position + width, n_words)
        begin = max(position, covered_to)
        if begin < end:
            total += starts[end] - starts[begin]
            covered_to = end
    return total


def _repeated_gram_chars(positions: list[int], classes: list[int], n: int, starts: list[int]) -> int:
    """Characters (spaces excluded) in n-grams that repeat an earlier one, scanning left to right and
    skipping past each repeat, so overlapping repeats are not counted twice. `positions` and `classes`
    list every n-gram that occurs more than once; those seen once never count and never matter."""
    seen: set[int] = set()
    total, resume = 0, 0
    for position, gram in zip(positions, classes, strict=True):
        if position < resume:
            continue  # inside a repeat already counted: skipped, and not remembered
        if gram in seen:
            total += starts[position + n] - starts[position]
            resume = position + n
        else:
            seen.add(gram)
    return total


# ------------------------------------------------------------------------------------------------- c4

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_TERMINAL = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4Config(StepConfig):
    """C4's page rules: line removals (reported as an edit) and whole-page drops."""

    type: Literal["c4"] = "c4"
    remove_citations: bool = Field(True, description='strip Wikipedia-style citation marks ("[1]", "[edit]")')
    filter_no_terminal_punct: bool = Field(
        True, description='remove lines not ending in . ? ! " \' (or ending in "...")'
    )
    min_words_per_line: int = Field(3, ge=0, description="remove lines with fewer words (0: off)")
    max_word_length: int | None = Field(
        1000, ge=1, description="remove lines holding a longer word (null: off)"
    )
    min_num_sentences: int = Field(
        5, ge=0, description="drop pages with fewer sentences in kept lines (0: off)"
    )
    filter_lorem_ipsum: bool = Field(True, description='drop pages with "lorem ipsum" in a kept line')
    filter_javascript: bool = Field(True, description='remove lines mentioning "javascript"')
    filter_curly_bracket: bool = Field(True, description='drop pages with "{" in a kept line')
    filter_policy: bool = Field(True, description="remove lines about terms of use, privacy or cookie policy")

    def build(self) -> C4Filter:
        return C4Filter(self)


class C4Filter(Step):
    name = "c4"

    def __init__(self, config: C4Config | None = None):
        super().__init__()
        self.config = config or C4Config()

    def apply(self, doc: Document) -> Document | Edit | Drop:
        cfg = self.config
        kept: list[str] = []
        removed: Counter[str] = Counter()
        sentences = 0
        lines = doc.text.splitlines()
        paragraph_break = False
        for raw in lines:
            line = original = raw.strip()
            if not line:
                # Blank lines are kept as paragraph breaks (collapsed to one) rather than dropped as the
                # reference does: later steps such as paragraph dedup need the paragraphs.
                paragraph_break = bool(kept)
                continue
            if cfg.remove_citations and "[" in line:
                line = _CITATION.sub("", line)
            # The cheap test first: most failing lines (code, headings, menus) end without punctuation.
            if cfg.filter_no_terminal_punct and (not line.endswith(_TERMINAL) or line.endswith("...")):
                removed["no terminal punctuation"] += 1
                continue
            words = original.split()  # counted before citations are removed, as the reference does
            if cfg.max_word_length is not None and len(original) > cfg.max_word_length:
                if max(map(len, words), default=0) > cfg.max_word_length:
                    removed["word too long"] += 1
                    continue
            if len(words) < cfg.min_words_per_line:
                removed["too few words"] += 1
                continue
            lowered = line.lower()
            if cfg.filter_lorem_ipsum and "lorem ipsum" in lowered:
                return Drop("c4.lorem_ipsum", f"line {len(kept) + sum(removed.values()) + 1}: {line[:80]!r}")
            if cfg.filter_javascript and "javascript" in lowered:
                removed["javascript"] += 1
                continue
            if cfg.filter_curly_bracket and "{" in line:
                return Drop(
                    "c4.curly_bracket", f"line {len(kept) + sum(removed.values()) + 1}: {line[:80]!r}"
                )
            if cfg.filter_policy and any(phrase in lowered for phrase in _POLICY):
                removed["policy"] += 1
                continue
            if cfg.min_num_sentences:
                sentences += count_sentences(line)
            if paragraph_break:
                kept.append("")
                paragraph_break = False
            kept.append(line)
        if sentences < cfg.min_num_sentences:
            return Drop(
                "c4.too_few_sentences", f"{sentences} sentences in kept lines < {cfg.min_num_sentences}"
            )
        text = "\n".join(kept)
        if text == doc.text:
            return doc
        if removed:
            why = ", ".join(f"{reason}: {count}" for reason, count in removed.most_common())
            detail = (
                f"{sum(removed.values())} of {sum(1 for line in lines if line.strip())} lines removed ({why})"
            )
            return Edit(doc.with_text(text), "c4.lines_removed", detail)
        return Edit(
            doc.with_text(text), "c4.lines_trimmed", "citations, blank lines or surrounding spaces removed"
        )


# -------------------------------------------------------------------------------------------- fineweb

_LINE_END = tuple(SENTENCE_END)


class FineWebConfig(StepConfig):
    """FineWeb's line-level rules for web pages."""

    type: Literal["fineweb"] = "fineweb"
    line_punct_thr: float = Field(
        0.12, ge=0, le=1, description="smallest fraction of lines ending in terminal punctuation"
    )
    line_punct_exclude_zero: bool = Field(False, description="keep pages where no line ends in punctuation")
    short_line_thr: float = Field(0.67, ge=0, le=1, description="largest fraction of short lines")
    short_line_length: int = Field(30, ge=0, description="a line this long or shorter is short")
    char_duplicates_ratio: float = Field(
        0.01, ge=0, le=1, description="largest share of characters in lines that repeat an earlier line"
    )
    new_line_ratio: float = Field(0.3, ge=0, description="most newlines per word")

    def build(self) -> FineWebFilter:
        return FineWebFilter(self)


class FineWebFilter(Step):
    name = "fineweb"

    def __init__(self, config: FineWebConfig | None = None):
        super().__init__()
        self.config = config or FineWebConfig()

    def apply(self, doc: Document) -> Document | Drop:
        cfg, text = self.config, doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return Drop("fineweb.empty", "no non-blank line")
        punctuated = sum(1 for line in lines if line.endswith(_LINE_END)) / len(lines)
        if punctuated < cfg.line_punct_thr and not (punctuated == 0 and cfg.line_punct_exclude_zero):
            return Drop(
                "fineweb.line_punct_ratio",
                f"{punctuated:.3f} of lines end in punctuation < {cfg.line_punct_thr}",
            )
        short = sum(1 for line in lines if len(line) <= cfg.short_line_length) / len(lines)
        if short > cfg.short_line_thr:
            return Drop("fineweb.short_line_ratio", f"{short:.3f} of lines are short > {cfg.short_line_thr}")
        duplicated = _ratio(_duplicates(lines)[1], len(text) - text.count("\n"))
        if duplicated > cfg.char_duplicates_ratio:
            return Drop(
                "fineweb.char_dup_ratio",
                f"{duplicated:.3f} of characters in repeated lines > {cfg.char_duplicates_ratio}",
            )
        per_word = _ratio(text.count("\n"), len(words_of(text)))
        if per_word > cfg.new_line_ratio:
            return Drop("fineweb.newline_ratio", f"{per_word:.3f} newlines per word > {cfg.new_line_ratio}")
        return doc


QUALITY_STEP_CONFIGS = (GopherQualityConfig, GopherRepetitionConfig, C4Config, FineWebConfig)
