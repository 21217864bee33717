"""The data executor: worker processes (and Ray) give the same documents, drops, edits and statistics
in the same order as running the steps here, whatever the worker count."""

from __future__ import annotations

import random

import pytest

from lmloom.data.documents import Document
from lmloom.data.executor import ExecutorConfig, execute, split_chain
from lmloom.data.steps import Drop, Edit, ExactDedup, MinChars, NormalizeUnicode, Step, StripControlChars


class Shout(Step):
    """Edits every document with a 'q' in it: a per-document step that rewrites."""

    name = "shout"

    def apply(self, doc: Document) -> Document | Edit | Drop:
        if "q" in doc.text:
            return Edit(doc.with_text(doc.text.upper()), "shout.q", "had a q")
        return doc


class DropOdd(Step):
    name = "drop_odd"

    def apply(self, doc: Document) -> Document | Drop:
        return Drop("drop_odd.odd", doc.id) if int(doc.id) % 7 == 3 else doc


def corpus(n: int = 700) -> list[Document]:
    rng = random.Random(5)
    words = ["alpha", "beta", "quux", "gamma", "delta", "e\u0301te", "\x07bell"]
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        if i % 11 == 0 and docs:  # exact duplicates of an earlier document
            text = docs[rng.randrange(len(docs))].text
        docs.append(Document(str(i), text, "prose", "test"))
    return docs


def chain() -> list[Step]:
    return [NormalizeUnicode("NFC"), StripControlChars(), Shout(), DropOdd(), MinChars(8), ExactDedup()]


def run(config: ExecutorConfig):
    steps = chain()
    events = []
    out = list(
        execute(
            corpus(),
            steps,
            config,
            on_drop=lambda doc, step, drop: events.append(("drop", doc.id, step, drop.reason)),
            on_edit=lambda doc, step, edit: events.append(("edit", doc.id, step, edit.reason, doc.text)),
        )
    )
    stats = [step.stats.to_json() | {"seconds": 0} for step in steps]
    return [(d.id, d.text) for d in out], events, stats


def test_chain_splits_at_the_first_global_step():
    head, tail = split_chain(chain())
    assert [s.name for s in head] == ["normalize", "control_chars", "shout", "drop_odd", "min_chars"]
    assert [s.name for s in tail] == ["dedup"]


@pytest.mark.parametrize("workers", [2, 3])
def test_worker_processes_match_a_single_process(workers):
    serial = run(ExecutorConfig(workers=1))
    parallel = run(ExecutorConfig(workers=workers, batch_docs=16))
    assert parallel == serial
    docs, events, stats = serial
    kinds = {e[0] for e in events}
    assert kinds == {"drop", "edit"} and len(docs) > 100
    assert {e[3] for e in events if e[0] == "drop"} >= {"drop_odd.odd", "duplicate"}


def test_origins_stay_in_the_main_process():
    class Origin:
        kept = 0

    origin = Origin()
    docs = [Document(str(i), f"document number {i}", "prose", "t", origin=origin) for i in range(50)]
    out = list(
        execute(docs, [NormalizeUnicode("NFC"), ExactDedup()], ExecutorConfig(workers=2, batch_docs=8))
    )
    assert all(doc.origin is origin for doc in out) and len(out) == 50
