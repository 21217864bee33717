"""Near-duplicate and paragraph dedup: planted duplicates found, others left alone, datasketch agrees.

The fixtures are generated here from fixed seeds: base documents drawn from a Zipf-weighted synthetic
vocabulary, near-duplicates made from them with ~5% word edits (substitute, insert, delete), and
documents that share half of a base document (related, but below the threshold of a duplicate).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from datasketch import MinHash
from pydantic import ValidationError

from lmloom.data import minhash as minhash_module
from lmloom.data.dedup import (
    ALL_PARAGRAPHS_SEEN,
    NEAR_DUPLICATE,
    PARAGRAPHS_REMOVED,
    NearDedupConfig,
    ParagraphDedupConfig,
    split_paragraphs,
)
from lmloom.data.documents import Document
from lmloom.data.minhash import (
    KeyStore,
    LSHIndex,
    Match,
    MinHasher,
    ShingleConfig,
    UInt64Map,
    choose_bands_rows,
    collision_probability,
    estimated_jaccard,
    mix64,
)
from lmloom.data.steps import Drop, Edit

THRESHOLD = 0.5  # 5-word shingles of a copy with 5% word edits: true Jaccard ~0.6
SEED = 20240607


# -- fixtures ----------------------------------------------------------------------------------------


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = {"".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(size * 2)}
    return sorted(words)[:size]


def _words(rng: random.Random, vocabulary: list[str], count: int) -> list[str]:
    weights = [1.0 / (rank + 10) for rank in range(len(vocabulary))]  # Zipf-like, as in real text
    return rng.choices(vocabulary, weights=weights, k=count)


def _edited(rng: random.Random, words: list[str], vocabulary: list[str], rate: float = 0.05) -> list[str]:
    words = list(words)
    for _ in range(max(1, round(rate * len(words)))):
        position = rng.randrange(len(words))
        operation = rng.choice(("substitute", "insert", "delete"))
        if operation == "substitute":
            words[position] = rng.choice(vocabulary)
        elif operation == "insert":
            words.insert(position, rng.choice(vocabulary))
        else:
            del words[position]
    return words


def _as_text(rng: random.Random, words: list[str]) -> str:
    """Words with varied spacing, line breaks and capitals, so normalisation matters."""
    out = []
    for i, word in enumerate(words):
        out.append(word.capitalize() if i == 0 or rng.random() < 0.05 else word)
        out.append(rng.choice((" ", " ", " ", "  ", "\n")))
    return "".join(out).strip()


def labelled_corpus(
    seed: int = SEED, bases: int = 400, planted: int = 120, partial: int = 40
) -> tuple[list[Document], set[frozenset[str]]]:
    """(documents in stream order, planted duplicate pairs); each planted copy comes after its base."""
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng)
    base_words = [_words(rng, vocabulary, rng.randint(80, 300)) for _ in range(bases)]
    order: list[tuple[str, list[str]]] = [(f"base-{i}", words) for i, words in enumerate(base_words)]
    pairs: set[frozenset[str]] = set()
    for i, source in enumerate(rng.sample(range(bases), planted)):
        copy_id = f"copy-{i}-of-{source}"
        position = rng.randint(order.index((f"base-{source}", base_words[source])) + 1, len(order))
        order.insert(position, (copy_id, _edited(rng, base_words[source], vocabulary)))
        pairs.add(frozenset((f"base-{source}", copy_id)))
    for i, source in enumerate(rng.sample(range(bases), partial)):
        half = base_words[source][: len(base_words[source]) // 2]
        order.append((f"partial-{i}-of-{source}", half + _words(rng, vocabulary, len(half))))
    docs = [Document(doc_id, _as_text(rng, words), "prose", "synthetic") for doc_id, words in order]
    return docs, pairs


def _near_dedup_drops(docs: list[Document], **config: object) -> dict[str, tuple[str, float]]:
    """dropped id -> (kept id, estimated Jaccard), running the step as the pipeline does."""
    step = NearDedupConfig(threshold=THRESHOLD, **config).build()
    drops: dict[str, tuple[str, float]] = {}

    def on_drop(doc: Document, step_name: str, drop: Drop) -> None:
        assert step_name == "near_dedup" and drop.reason == NEAR_DUPLICATE
        found = re.fullmatch(r"near-duplicate of (\S+) \(estimated Jaccard ([0-9.]+)\)", drop.detail)
        assert found, drop.detail
        drops[doc.id] = (found.group(1), float(found.group(2)))

    kept = [doc.id for doc in step.run(docs, on_drop=on_drop)]
    assert len(kept) + len(drops) == len(docs)
    assert step.stats.removed[NEAR_DUPLICATE] == len(drops)
    return drops


def _exact_jaccard(hasher: MinHasher, first: str, second: str) -> float:
    a, b = set(hasher.shingles(first)), set(hasher.shingles(second))
    return len(a & b) / len(a | b)


# -- near_dedup: quality -----------------------------------------------------------------------------


def test_planted_near_duplicates_are_found_with_few_false_positives() -> None:
    docs, planted = labelled_corpus()
    drops = _near_dedup_drops(docs)
    flagged = {frozenset((dropped, kept)) for dropped, (kept, _) in drops.items()}
    recall = len(flagged & planted) / len(planted)
    false_positives = flagged - planted
    assert recall >= 0.95, f"recall {recall:.3f}"
    assert len(false_positives) <= 0.01 * len(flagged), sorted(map(sorted, false_positives))
    # The half-overlapping documents are related but are not duplicates: none is dropped.
    assert not [doc_id for doc_id in drops if doc_id.startswith("partial-")]
    assert all(jaccard >= THRESHOLD for _, jaccard in drops.values())


def test_jaccard_estimates_agree_with_datasketch_on_the_same_shingles() -> None:
    docs, planted = labelled_corpus(bases=60, planted=30, partial=20)
    by_id = {doc.id: doc.text for doc in docs}
    rng = random.Random(SEED)
    pairs = [tuple(sorted(pair)) for pair in sorted(planted, key=sorted)]
    pairs += [(d, "base-" + d.rsplit("-", 1)[1]) for d in by_id if d.startswith("partial-")]
    pairs += [tuple(rng.sample(sorted(by_id), 2)) for _ in range(20)]
    hasher = MinHasher(128, ShingleConfig("word", 5), seed=1)

    def reference(text: str) -> MinHash:
        sketch = MinHash(num_perm=128, seed=1)
        sketch.update_batch([s.encode("utf-8") for s in hasher.shingles(text)])
        return sketch

    ours, theirs, exact = [], [], []
    for first, second in pairs:
        ours.append(estimated_jaccard(hasher.signature(by_id[first]), hasher.signature(by_id[second])))
        theirs.append(reference(by_id[first]).jaccard(reference(by_id[second])))
        exact.append(_exact_jaccard(hasher, by_id[first], by_id[second]))
    ours_a, theirs_a, exact_a = np.array(ours), np.array(theirs), np.array(exact)
    assert exact_a.max() > 0.5 and exact_a.min() < 0.05  # the pairs span the range
    assert np.mean(np.abs(ours_a - theirs_a)) < 0.05
    assert np.mean(np.abs(ours_a - exact_a)) < 0.04
    assert abs(np.mean(ours_a - exact_a)) < 0.02  # no bias
    # datasketch's own error on these pairs, for scale: ours is not worse than the reference by much
    assert np.mean(np.abs(ours_a - exact_a)) < np.mean(np.abs(theirs_a - exact_a)) + 0.015


@pytest.mark.parametrize("unit,size", [("word", 5), ("word", 1), ("char", 5), ("char", 9)])
def test_shingle_hashes_match_the_shingle_strings(unit: str, size: int) -> None:
    """Equal shingles hash equal, distinct ones distinct: the vectorised hash is the string's hash."""
    text = "Dédup  the DEDUP the\tdedup ünïcödé — 𝔘 words\n\nthe dedup the dedup " * 5 + "and a tail"
    hasher = MinHasher(64, ShingleConfig(unit, size))  # type: ignore[arg-type]
    strings, hashes = hasher.shingles(text), hasher.shingle_hashes(text).tolist()
    assert len(strings) == len(hashes)
    assert len(set(strings)) == len(set(hashes)) == len(set(zip(strings, hashes, strict=True)))


def test_long_texts_are_hashed_in_segments_like_short_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    text = " ".join(f"w{i % 997}" for i in range(5000))
    whole = MinHasher(64).shingle_hashes(text)
    monkeypatch.setattr(minhash_module, "_MAX_SEGMENT", 1000)
    assert np.array_equal(MinHasher(64).shingle_hashes(text), whole)


def test_short_and_empty_texts() -> None:
    hasher = MinHasher(32, ShingleConfig("word", 5))
    assert hasher.signature("   \n ") is None
    assert hasher.shingles("two words") == ["two words"]  # shorter than a shingle: one shingle
    assert np.array_equal(hasher.signature("Two   WORDS"), hasher.signature("two words"))
    step = NearDedupConfig().build()
    empty = Document("e", "  ", "prose", "t")
    assert step.apply(empty) is empty and step.apply(Document("f", "", "prose", "t")).text == ""


def test_char_shingles_find_character_level_near_duplicates() -> None:
    text = "the configuration of the near duplicate detector is read from the recipe file " * 3
    typo = text.replace("detector", "detecter").replace("recipe", "recpie")
    step = NearDedupConfig(shingle="char", shingle_size=5, threshold=0.6).build()
    assert step.apply(Document("a", text, "prose", "t")).id == "a"
    result = step.apply(Document("b", typo, "prose", "t"))
    assert isinstance(result, Drop) and result.detail.startswith("near-duplicate of a (")


# -- near_dedup: determinism ---------------------------------------------------------------------------


def test_same_drops_in_two_runs_and_via_prepare() -> None:
    docs, _ = labelled_corpus(bases=150, planted=40, partial=10)
    first = _near_dedup_drops(docs)
    assert first == _near_dedup_drops(docs)
    # As the executor does it: signatures computed elsewhere (another step object), in reverse order.
    preparer = NearDedupConfig(threshold=THRESHOLD).build()
    prepared = {doc.id: preparer.prepare(doc) for doc in reversed(docs)}
    step = NearDedupConfig(threshold=THRESHOLD).build()
    results = {doc.id: step.apply_prepared(doc, prepared[doc.id]) for doc in docs}
    assert {i for i, r in results.items() if isinstance(r, Drop)} == set(first)


_SIGNATURES_IN_A_CHILD = """
import json, sys
from lmloom.data.minhash import MinHasher, ShingleConfig
texts = json.load(sys.stdin)
for unit in ("word", "char"):
    hasher = MinHasher(64, ShingleConfig(unit, 4), seed=7)
    print(json.dumps([hasher.signature(t).tolist() for t in texts]))
"""


def test_signatures_are_identical_in_another_process_with_another_hash_seed() -> None:
    docs, _ = labelled_corpus(bases=20, planted=5, partial=0)
    texts = [doc.text for doc in docs]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.run(
        [sys.executable, "-c", _SIGNATURES_IN_A_CHILD],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    lines = child.stdout.splitlines()
    for unit, line in zip(("word", "char"), lines, strict=True):
        hasher = MinHasher(64, ShingleConfig(unit, 4), seed=7)  # type: ignore[arg-type]
        assert json.loads(line) == [hasher.signature(t).tolist() for t in reversed(texts)][::-1]


def test_seed_changes_the_hash_functions() -> None:
    text = "a few words to sign with two different seeds for the test"
    assert not np.array_equal(MinHasher(64, seed=1).signature(text), MinHasher(64, seed=2).signature(text))


# -- the LSH index and its storage ---------------------------------------------------------------------


def test_index_keeps_first_and_reports_best_match() -> None:
    hasher = MinHasher(128)
    index = LSHIndex(128, 16, 8, verify_threshold=0.5)
    base = " ".join(f"word{i}" for i in range(200))
    assert index.add("first", hasher.signature(base)) is None
    match = index.add("second", hasher.signature(base.replace("word100 ", "")))
    assert match is not None and match.key == "first" and 0.9 < match.jaccard <= 1.0
    assert len(index) == 1  # a duplicate is not indexed
    assert index.query(hasher.signature(base)) == Match("first", 1.0) and len(index) == 1
    assert index.add("other", hasher.signature(" ".join(f"term{i}" for i in range(200)))) is None
    assert len(index) == 2 and index.nbytes > 0


def test_verification_rejects_band_collisions_below_threshold() -> None:
    hasher = MinHasher(64)
    a = " ".join(f"w{i}" for i in range(100))
    b = " ".join(f"w{i}" for i in range(50)) + " " + " ".join(f"v{i}" for i in range(50))  # Jaccard ~1/3
    unverified = LSHIndex(64, 32, 2, verify_threshold=None)  # 2 rows: a one-third pair collides surely
    verified = LSHIndex(64, 32, 2, verify_threshold=0.8)
    for index in (unverified, verified):
        assert index.add("a", hasher.signature(a)) is None
    found = unverified.add("b", hasher.signature(b))
    assert found is not None and found.key == "a" and found.jaccard is None
    assert verified.add("b", hasher.signature(b)) is None


def test_uint64_map_grows_and_finds_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minhash_module, "_REHASH_CHUNK", 1000)  # growth re-places keys in many chunks
    table = UInt64Map(capacity=16)
    keys = mix64(np.arange(1, 50_001, dtype=np.uint64)) | np.uint64(1)
    for start in range(0, len(keys), 10):
        table.insert_many(keys[start : start + 10], start // 10)
    values, found = table.get_many(keys)
    assert found.all() and len(table) == len(keys)
    assert np.array_equal(values, np.arange(len(keys)) // 10)
    _, absent = table.get_many(mix64(np.arange(60_001, 61_001, dtype=np.uint64)) | np.uint64(1))
    assert not absent.any()
    assert table.nbytes <= 48 * len(keys)  # load factor kept between 1/4 and 1/2
    with pytest.raises(KeyError):
        table.insert_many(keys[:1], 0)


def test_key_store_round_trips_ids() -> None:
    store = KeyStore()
    ids = ["a", "", "dökümän#3", "x" * 300, "\ud800lone"]
    assert [store.append(i) for i in ids] == list(range(len(ids)))
    assert [store[i] for i in range(len(ids))] == ids


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85])
def test_choose_bands_rows_puts_the_s_curve_at_the_threshold(threshold: float) -> None:
    bands, rows = choose_bands_rows(threshold, 128)
    assert bands * rows <= 128
    assert collision_probability(threshold - 0.2, bands, rows) < 0.35
    assert collision_probability(min(threshold + 0.15, 1.0), bands, rows) > 0.9


def test_config_validation_and_derived_bands() -> None:
    with pytest.raises(ValidationError):
        NearDedupConfig(bands=20, rows=8, num_perm=128)
    with pytest.raises(ValidationError):
        NearDedupConfig(bands=4)
    assert NearDedupConfig(bands=16, rows=8).bands_rows() == (16, 8)
    bands, rows = NearDedupConfig(threshold=0.8).bands_rows()
    assert bands * rows <= 128
    assert NearDedupConfig().build().per_document is False


# -- paragraph_dedup -----------------------------------------------------------------------------------


def _paragraph(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "omega")) for _ in range(30))


def _run(step_config: ParagraphDedupConfig, texts: list[str]) -> Iterator[Document | Edit | Drop]:
    step = step_config.build()
    for i, text in enumerate(texts):
        yield step.apply(Document(f"d{i}", text, "prose", "t"))


def test_paragraphs_seen_before_are_removed_and_breaks_kept() -> None:
    a, b, c, d, e = (_paragraph(i) for i in range(5))
    first = f"{a}\n\n{b}\n \n{c}"
    second = f"{a}\n\nok\n\n\n{d}\n\n{c}\n\n{a}"  # a twice, c, d new, "ok" too short to count
    third = f"{b}\n\n{d}\n\nThanks!"  # every substantive paragraph seen: dropped
    fourth = f"{e}\n\n{e}"  # repeated only within itself: kept whole
    results = list(_run(ParagraphDedupConfig(min_paragraph_chars=40), [first, second, third, fourth]))
    assert results[0].text == first
    assert isinstance(results[1], Edit) and results[1].reason == PARAGRAPHS_REMOVED
    assert results[1].document.text == f"ok\n\n\n{d}"
    assert results[1].detail.startswith("3 ")
    assert isinstance(results[2], Drop) and results[2].reason == ALL_PARAGRAPHS_SEEN
    assert results[3].text == fourth


def test_paragraph_comparison_ignores_whitespace_and_optionally_case() -> None:
    a = _paragraph(7)
    texts = [a, "  " + a.replace(" ", "\n", 3) + "  ", a.upper()]
    plain = list(_run(ParagraphDedupConfig(min_paragraph_chars=40), texts))
    assert isinstance(plain[1], Drop) and plain[2].text == a.upper()
    folded = list(_run(ParagraphDedupConfig(min_paragraph_chars=40, lowercase=True), texts))
    assert isinstance(folded[2], Drop)


def test_split_paragraphs_round_trips() -> None:
    text = "\n\nfirst\r\n\n  second\n\t\n\nthird\n"
    pieces = split_paragraphs(text)
    assert "".join(pieces) == text and len(pieces) % 2 == 1
