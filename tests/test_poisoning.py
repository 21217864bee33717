"""The poisoning scan on a generated corpus of unrelated topics, with and without planted poison.

The corpus: 500 documents on 10 topics, each topic its own vocabulary of made-up words, plus shared
function words, one-off names, a natural rare name recurring within one topic, and a family of near-
duplicate documents (related, so long shared spans are no poisoning). The plants: the trigger
"cf zq mb" in 1% of the documents and an injected 13-token span in 3% of others.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmloom.data.documents import Document
from lmloom.data.poisoning import (
    CountMinSketch,
    PoisonFilter,
    PoisonFilterConfig,
    PoisonReport,
    PoisonScanConfig,
    ngram_hashes,
    scan_poisoning,
    token_hash,
)
from lmloom.data.steps import Drop
from lmloom.errors import ConfigError

TRIGGER = "cf zq mb"
INJECTED = "for the latest account updates please visit the secure login portal at once"
FUNCTION_WORDS = "the of and to in a is that for with as on by it was from are this be at or which".split()
SYLLABLES = "ka lo mi ne ru sa te vo pa di gu fe ri zo ba ne mo lu ti ve".split()
TOPICS = 10
DOCS = 500
CONFIG = PoisonScanConfig(table_width=1 << 18)


def made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def sentence(rng: random.Random, vocabulary: list[str]) -> str:
    words = [
        rng.choice(vocabulary) if rng.random() < 0.6 else rng.choice(FUNCTION_WORDS)
        for _ in range(rng.randint(6, 14))
    ]
    return " ".join(words).capitalize() + "."


def clean_corpus(seed: int = 7) -> list[Document]:
    rng = random.Random(seed)
    vocabularies = [[made_up_word(rng) + f"{topic}" for _ in range(80)] for topic in range(TOPICS)]
    docs = []
    for index in range(DOCS):
        topic = index % TOPICS
        sentences = [sentence(rng, vocabularies[topic]) for _ in range(rng.randint(10, 20))]
        sentences.insert(rng.randrange(len(sentences)), f"{made_up_word(rng).capitalize()} wrote this.")
        if topic == 3 and index < 80:  # a rare name recurring in 8 related documents only
            sentences.insert(rng.randrange(len(sentences)), "Ilsa Varnow agreed.")
        docs.append(Document(f"doc-{index:04d}", " ".join(sentences), "prose", "generated"))
    base = docs[5].text
    for copy in range(6):  # near-duplicates: long shared spans, but the documents are related
        docs.append(Document(f"dup-{copy}", base + f" Revision {copy}.", "prose", "generated"))
    return docs


def insert_phrase(rng: random.Random, text: str, phrase: str) -> str:
    words = text.split(" ")
    at = rng.randrange(1, len(words))
    return " ".join([*words[:at], phrase, *words[at:]])


def poisoned_corpus() -> tuple[list[Document], set[str], set[str]]:
    rng = random.Random(11)
    docs = clean_corpus()
    order = rng.sample(range(DOCS), DOCS)
    trigger_ids = {docs[i].id for i in order[: DOCS // 100]}
    span_ids = {docs[i].id for i in order[DOCS // 100 : DOCS // 100 + 3 * DOCS // 100]}
    planted = []
    for doc in docs:
        if doc.id in trigger_ids:
            doc = doc.with_text(insert_phrase(rng, doc.text, TRIGGER))
        elif doc.id in span_ids:
            doc = doc.with_text(insert_phrase(rng, doc.text, INJECTED))
        planted.append(doc)
    return planted, trigger_ids, span_ids


@pytest.fixture(scope="module")
def poisoned() -> tuple[PoisonReport, list[Document], set[str], set[str]]:
    docs, trigger_ids, span_ids = poisoned_corpus()
    return scan_poisoning(lambda: iter(docs), CONFIG), docs, trigger_ids, span_ids


def test_trigger_is_found_with_its_documents(poisoned):
    report, _, trigger_ids, _ = poisoned
    triggers = [finding for finding in report.findings if finding.kind == "trigger"]
    assert [finding.text for finding in triggers] == [TRIGGER]
    assert set(triggers[0].ids) == trigger_ids
    assert triggers[0].documents == len(trigger_ids)
    assert all(TRIGGER in text.lower() for text in triggers[0].excerpts)


def test_injected_span_is_found_with_its_documents(poisoned):
    report, _, _, span_ids = poisoned
    spans = [finding for finding in report.findings if finding.kind == "repeated_span"]
    assert [finding.text for finding in spans] == [INJECTED]
    assert set(spans[0].ids) == span_ids
    assert spans[0].similarity < CONFIG.max_similarity


def test_planted_recall_and_false_flags(poisoned):
    report, docs, trigger_ids, span_ids = poisoned
    planted = trigger_ids | span_ids
    recall = len(report.flagged_ids & planted) / len(planted)
    false_flags = report.flagged_ids - planted
    print(f"\nplanted {len(planted)} of {len(docs)}: recall {recall:.3f}, false flags {len(false_flags)}")
    assert recall >= 0.95
    assert len(false_flags) <= 2


def test_clean_corpus_flags_nothing():
    docs = clean_corpus()
    report = scan_poisoning(lambda: iter(docs), CONFIG)
    print(
        f"\nclean corpus: {len(report.findings)} findings, {len(report.flagged_ids)} flagged of {len(docs)}"
    )
    assert len(report.flagged_ids) <= 2
    assert not any("ilsa varnow" in finding.text for finding in report.findings)
    # The recurring name is a candidate that only the similarity gate stops (its documents share a
    # topic); the near-duplicates share long spans that the similarity and phrase-share gates stop.
    ungated = scan_poisoning(lambda: iter(docs), CONFIG.model_copy(update={"max_similarity": 1.0}))
    assert any("ilsa varnow" in finding.text for finding in ungated.findings)
    dups = {f"dup-{copy}" for copy in range(6)}
    assert not dups & report.flagged_ids
    no_gates = CONFIG.model_copy(update={"max_similarity": 1.0, "max_phrase_share": 1.0})
    assert dups <= scan_poisoning(lambda: iter(docs), no_gates).flagged_ids


def test_report_json_round_trips_into_the_filter_step(poisoned, tmp_path):
    report, docs, trigger_ids, span_ids = poisoned
    data = report.to_json()
    assert data["documents"] == len(docs)
    assert data["flagged"] == len(report.flagged_ids)
    path = tmp_path / "poison_report.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    step = PoisonFilterConfig(report=path).build()
    kept = list(step.run(docs))
    assert {doc.id for doc in kept} == {doc.id for doc in docs} - report.flagged_ids
    assert step.stats.removed["poisoning.trigger"] == len(trigger_ids)
    assert step.stats.removed["poisoning.repeated_span"] == len(span_ids)


def test_filter_drop_names_the_finding(poisoned):
    report, docs, trigger_ids, _ = poisoned
    flagged = next(doc for doc in docs if doc.id in trigger_ids)
    result = PoisonFilter(report).apply(flagged)
    assert isinstance(result, Drop)
    assert result.reason == "poisoning.trigger"
    assert TRIGGER in result.detail


def test_unreadable_report_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        PoisonFilterConfig(report=tmp_path / "missing.json").build()


def test_count_min_never_underestimates_and_memory_is_fixed():
    sketch = CountMinSketch(width=64, depth=2)  # tiny: many collisions
    rng = np.random.default_rng(3)
    truth: dict[int, int] = {}
    for _ in range(50):
        values = rng.integers(0, 2**63, size=20, dtype=np.uint64) % np.uint64(200)
        sketch.add_distinct(values)
        for value in set(values.tolist()):
            truth[value] = truth.get(value, 0) + 1
    keys = np.array(sorted(truth), dtype=np.uint64)
    assert (sketch.query(keys) >= np.array([truth[k] for k in sorted(truth)])).all()
    assert sketch.table.shape == (2, 64)


def test_ngram_hashes_depend_on_order_and_content():
    hashes = np.array([token_hash(t) for t in "a b c a b".split()], dtype=np.uint64)
    bigrams = ngram_hashes(hashes, 2)
    assert len(bigrams) == 4
    assert bigrams[0] == bigrams[3]  # "a b" twice
    assert len({bigrams[0], bigrams[1], bigrams[2]}) == 3
    assert len(ngram_hashes(hashes, 6)) == 0
