"""A corpus-wide scan for data poisoning: backdoor triggers and injected repeated spans.

Two signals need the whole corpus, so this is not a per-document step:

- trigger: a short n-gram made of tokens rare in the corpus that recurs in several documents that are
  otherwise unrelated ("... cf zq mb ..." planted into 1% of the corpus to teach a backdoor). Natural
  rare phrases (a name, a term of art) recur in documents about the same thing, so similarity decides.
- repeated_span: a long span (>= `span_tokens` tokens) repeated verbatim across many unrelated
  documents (an injected instruction or link). Near-duplicate documents share long spans too, but
  they are similar to each other; that is dedup's business, not this scan's.

`scan_poisoning` reads the corpus twice with bounded memory:

1. Count, per document, distinct tokens and distinct n-grams (trigger and span sizes) into count-min
   sketches: fixed-size numpy tables whose estimates can only be too high, never too low.
2. Find each document's candidate n-grams (estimated document frequency and token rarity pass the
   thresholds) and count them exactly; for up to `similarity_sample` documents per candidate keep a
   bottom-k sketch of the document's content tokens to measure how related those documents are.
   Candidates found in the same set of documents are chained into one phrase ("cf zq", "zq mb" ->
   "cf zq mb"), whose documents must be unrelated once the phrase itself is left out.

Memory is the three sketches plus what is kept per exact candidate n-gram: its document ids (needed for
`flagged_ids`; capped by `max_candidate_documents`), a few examples and the similarity sketches.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.data.documents import Document, excerpt
from lmloom.data.steps import Drop, Step, StepConfig
from lmloom.errors import ConfigError

FindingKind = Literal["trigger", "repeated_span"]

_TOKEN = re.compile(r"\w+")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: a polynomial rolling hash base mod 2**64
_ROW_SEEDS = (np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344), np.uint64(0xA4093822299F31D0))


class PoisonScanConfig(StrictConfig):
    """Thresholds of the poisoning scan; the defaults suit corpora of hundreds to millions of documents."""

    trigger_ngram: int = Field(
        2, ge=1, le=4, description="tokens per trigger n-gram; runs merge into phrases"
    )
    min_trigger_docs: int = Field(3, ge=2, description="a trigger must occur in at least this many documents")
    rare_token_fraction: float = Field(
        0.02, gt=0.0, le=1.0, description="a token is rare in at most this fraction of documents"
    )
    min_cohesion: float = Field(
        0.5, ge=0.0, le=1.0, description="trigger documents / documents of its most frequent token"
    )
    span_tokens: int = Field(8, ge=4, description="a repeated span has at least this many tokens")
    min_span_docs: int = Field(5, ge=2, description="a repeated span must occur in this many documents")
    common_token_fraction: float = Field(
        0.3, gt=0.0, le=1.0, description="tokens in more documents than this are ignored for similarity"
    )
    max_similarity: float = Field(
        0.25, ge=0.0, le=1.0, description="flag only when the documents' mean Jaccard similarity is below"
    )
    similarity_sample: int = Field(32, ge=2, description="documents per phrase compared for similarity")
    sketch_size: int = Field(64, ge=8, description="bottom-k sketch size of a document's content tokens")
    table_width: int = Field(1 << 20, ge=1 << 10, description="counters per count-min row")
    table_depth: int = Field(2, ge=1, le=len(_ROW_SEEDS), description="count-min rows")
    max_phrase_share: float = Field(
        0.5, gt=0.0, le=1.0, description="skip phrases longer than this share of their documents' tokens"
    )
    max_examples: int = Field(5, ge=1, description="example ids and excerpts kept per finding")
    max_candidate_documents: int = Field(
        5_000_000, ge=1, description="phrase-document pairs kept in pass 2 before the scan stops adding"
    )


@dataclass
class Finding:
    kind: FindingKind
    text: str  # the phrase, as lower-cased tokens joined by spaces
    documents: int
    example_ids: list[str]
    excerpts: list[str]
    similarity: float  # mean pairwise Jaccard of the documents' content, the phrase left out
    score: float
    ids: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "text": self.text,
            "documents": self.documents,
            "example_ids": self.example_ids,
            "excerpts": self.excerpts,
            "similarity": round(self.similarity, 4),
            "score": round(self.score, 4),
            "ids": self.ids,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Finding:
        return cls(**data)


@dataclass
class PoisonReport:
    documents: int
    findings: list[Finding]
    truncated: bool = False  # max_candidate_documents was reached: some occurrences were not recorded

    @property
    def flagged_ids(self) -> set[str]:
        return {doc_id for finding in self.findings for doc_id in finding.ids}

    def finding_by_id(self) -> dict[str, Finding]:
        """The first (highest-scoring) finding of each flagged document."""
        first: dict[str, Finding] = {}
        for finding in self.findings:
            for doc_id in finding.ids:
                first.setdefault(doc_id, finding)
        return first

    def to_json(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "truncated": self.truncated,
            "flagged": len(self.flagged_ids),
            "findings": [finding.to_json() for finding in self.findings],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoisonReport:
        return cls(
            data["documents"], [Finding.from_json(f) for f in data["findings"]], data.get("truncated", False)
        )


# --- hashing -------------------------------------------------------------------------------------------


@lru_cache(maxsize=1 << 16)  # bounded; frequent tokens stay cached
def token_hash(token: str) -> int:
    """A stable 64-bit hash (Python's own str hash changes from process to process)."""
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def ngram_hashes(token_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram: sum of token_hash[i + k] * B**(n-1-k) mod 2**64, mixed."""
    count = len(token_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    result = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n):
            result = result * _NGRAM_MULTIPLIER + token_hashes[offset : offset + count]
    return _mix(result)


class CountMinSketch:
    """Document-frequency estimates for 64-bit hashes in `depth` x `width` uint32 counters."""

    def __init__(self, width: int, depth: int):
        self.width = np.uint64(width)
        self.table = np.zeros((depth, width), dtype=np.uint32)

    def _rows(self, hashes: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for row in range(self.table.shape[0]):
            yield row, (_mix(hashes ^ _ROW_SEEDS[row]) % self.width).astype(np.intp)

    def add_distinct(self, hashes: np.ndarray) -> None:
        """Count one document holding `hashes`: each counter at most once, so a counter is the number
        of documents holding any hash that maps to it, never less than the frequency of each."""
        for row, columns in self._rows(hashes):
            self.table[row][np.unique(columns)] += 1

    def query(self, hashes: np.ndarray) -> np.ndarray:
        estimate = np.full(len(hashes), np.iinfo(np.uint32).max, dtype=np.uint32)
        for row, columns in self._rows(hashes):
            np.minimum(estimate, self.table[row][columns], out=estimate)
        return estimate


def tokens_of(text: str) -> list[str]:
    return [token.lower() for token in _TOKEN.findall(text)]


def tokenize(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Tokens as `tokens_of` gives them, with their character spans."""
    tokens, offsets = [], []
    for match in _TOKEN.finditer(text):
        tokens.append(match.group().lower())
        offsets.append(match.span())
    return tokens, offsets


def _hash_tokens(tokens: list[str]) -> np.ndarray:
    return np.fromiter((token_hash(token) for token in tokens), dtype=np.uint64, count=len(tokens))


# --- similarity ----------------------------------------------------------------------------------------


def bottom_k(hashes: np.ndarray, k: int) -> np.ndarray:
    return np.unique(hashes)[:k]


def sketch_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard estimate from two bottom-k sketches: the share of the union's k smallest held by both."""
    k = max(len(a), len(b))
    if k == 0:
        return 0.0
    union = np.union1d(a, b)[:k]
    both = np.intersect1d(a, b, assume_unique=True)
    return float(np.isin(union, both, assume_unique=True).sum()) / len(union)


def mean_pairwise_similarity(sketches: list[np.ndarray]) -> float:
    pairs = list(combinations(sketches, 2))
    return sum(sketch_jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0


# --- the scan -----------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """One exact candidate n-gram seen in pass 2: where it occurs and how related those documents are."""

    ids: list[str] = field(default_factory=list)
    excerpts: list[str] = field(default_factory=list)
    sketches: list[np.ndarray] = field(default_factory=list)  # of the documents' content tokens
    shares: list[float] = field(default_factory=list)  # n-gram tokens / document tokens


def _window_max(values: np.ndarray, n: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(values, n).max(axis=1)


def chain_ngrams(ngrams: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The phrase that overlapping n-grams spell ("a b c", "b c d" -> "a b c d"); the longest chain wins."""
    following = {gram[:-1]: gram for gram in ngrams}
    starts = set(following) - {gram[1:] for gram in ngrams}
    best: tuple[str, ...] = ngrams[0]
    for head in sorted(starts):
        phrase, gram, seen = list(following[head]), following[head], {following[head]}
        while (gram := following.get(gram[1:])) is not None and gram not in seen:
            seen.add(gram)
            phrase.append(gram[-1])
        if len(phrase) > len(best):
            best = tuple(phrase)
    return best


class _Scanner:
    def __init__(self, config: PoisonScanConfig):
        self.config = config
        self.tokens = CountMinSketch(config.table_width, config.table_depth)
        self.trigger_ngrams = CountMinSketch(config.table_width, config.table_depth)
        self.span_ngrams = CountMinSketch(config.table_width, config.table_depth)
        self.documents = 0
        # Exact counts of the n-grams the sketches proposed; an n-gram proposed only because its
        # counters collided with others is seen in too few documents here and goes no further.
        self.candidates: dict[tuple[FindingKind, tuple[str, ...]], _Candidate] = {}
        self.recorded = 0
        self.truncated = False

    def count(self, doc: Document) -> None:
        hashes = _hash_tokens(tokens_of(doc.text))
        self.documents += 1
        self.tokens.add_distinct(hashes)
        self.trigger_ngrams.add_distinct(ngram_hashes(hashes, self.config.trigger_ngram))
        self.span_ngrams.add_distinct(ngram_hashes(hashes, self.config.span_tokens))

    def inspect(self, doc: Document) -> None:
        config = self.config
        tokens, offsets = tokenize(doc.text)
        hashes = _hash_tokens(tokens)
        token_df = self.tokens.query(hashes)
        content = np.unique(hashes[token_df <= config.common_token_fraction * self.documents])
        positions: dict[tuple[FindingKind, tuple[str, ...]], int] = {}

        n = config.trigger_ngram
        if len(tokens) >= n:
            rare_limit = max(config.rare_token_fraction * self.documents, config.min_trigger_docs)
            ngram_df = self.trigger_ngrams.query(ngram_hashes(hashes, n))
            most_frequent = _window_max(token_df, n)
            candidate = (
                (ngram_df >= config.min_trigger_docs)
                & (most_frequent <= rare_limit)
                & (ngram_df >= config.min_cohesion * most_frequent)
            )
            for start in np.flatnonzero(candidate).tolist():
                positions.setdefault(("trigger", tuple(tokens[start : start + n])), start)

        n = config.span_tokens
        if len(tokens) >= n:
            ngram_df = self.span_ngrams.query(ngram_hashes(hashes, n))
            for start in np.flatnonzero(ngram_df >= config.min_span_docs).tolist():
                positions.setdefault(("repeated_span", tuple(tokens[start : start + n])), start)

        for key, start in positions.items():
            if self.recorded >= config.max_candidate_documents:
                self.truncated = True
                return
            end = start + len(key[1])
            candidate_record = self.candidates.setdefault(key, _Candidate())
            candidate_record.ids.append(doc.id)
            self.recorded += 1
            if len(candidate_record.excerpts) < config.max_examples:
                first, last = offsets[start][0], offsets[end - 1][1]
                candidate_record.excerpts.append(excerpt(doc.text[max(0, first - 40) : last + 40]))
            if len(candidate_record.sketches) < config.similarity_sample:
                own = np.isin(content, hashes[start:end])
                candidate_record.sketches.append(bottom_k(content[~own], config.sketch_size))
                candidate_record.shares.append(len(key[1]) / len(tokens))

    def findings(self) -> list[Finding]:
        """Candidates seen in enough documents, grouped by their exact document set into phrases."""
        config = self.config
        groups: dict[tuple[FindingKind, frozenset[str]], list[tuple[str, ...]]] = {}
        for (kind, gram), record in self.candidates.items():
            minimum = config.min_trigger_docs if kind == "trigger" else config.min_span_docs
            if len(record.ids) >= minimum:
                groups.setdefault((kind, frozenset(record.ids)), []).append(gram)
        results = []
        for (kind, ids), grams in groups.items():
            phrase = chain_ngrams(grams)
            record = self.candidates[(kind, grams[0])]
            # A phrase that is most of its documents makes them near-duplicates (dedup's business),
            # not unrelated documents carrying a plant.
            share = min(1.0, sum(record.shares) / len(record.shares) * len(phrase) / len(grams[0]))
            if share > config.max_phrase_share:
                continue
            phrase_hashes = _hash_tokens(list(phrase))
            sketches = [sketch[~np.isin(sketch, phrase_hashes)] for sketch in record.sketches]
            similarity = mean_pairwise_similarity(sketches)
            if similarity >= config.max_similarity:
                continue
            results.append(
                Finding(
                    kind=kind,
                    text=" ".join(phrase),
                    documents=len(ids),
                    example_ids=record.ids[: config.max_examples],
                    excerpts=record.excerpts,
                    similarity=similarity,
                    score=(1.0 - similarity) * math.log2(1 + len(ids)),
                    ids=record.ids,
                )
            )
        results.sort(key=lambda finding: (-finding.score, finding.kind, finding.text))
        return results


def scan_poisoning(documents: Callable[[], Iterable[Document]], config: PoisonScanConfig) -> PoisonReport:
    """Scan a corpus for backdoor triggers and injected repeated spans; `documents()` is called twice."""
    scanner = _Scanner(config)
    for doc in documents():
        scanner.count(doc)
    for doc in documents():
        scanner.inspect(doc)
    return PoisonReport(scanner.documents, scanner.findings(), scanner.truncated)


# --- removing what the scan flagged ---------------------------------------------------------------------


class PoisonFilter(Step):
    """Drops the documents a `PoisonReport` flagged, with reason "poisoning.<kind>"."""

    name = "poison_filter"

    def __init__(self, report: PoisonReport):
        super().__init__()
        self.flagged = report.finding_by_id()

    def apply(self, doc: Document) -> Document | Drop:
        finding = self.flagged.get(doc.id)
        if finding is None:
            return doc
        return Drop(f"poisoning.{finding.kind}", f"{finding.text!r} in {finding.documents} documents")


class PoisonFilterConfig(StepConfig):
    """Remove documents flagged by a poisoning scan report (`PoisonReport.to_json()` saved as JSON)."""

    type: Literal["poison_filter"] = "poison_filter"
    report: Path = Field(description="the scan report, a JSON file written from PoisonReport.to_json()")

    def build(self) -> PoisonFilter:
        try:
            data = json.loads(Path(self.report).expanduser().read_text(encoding="utf-8"))
            report = PoisonReport.from_json(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"poison_filter.report: cannot read {str(self.report)!r} ({exc})") from exc
        return PoisonFilter(report)
