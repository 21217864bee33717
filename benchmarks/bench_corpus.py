"""The benchmark corpus: the local Python installation cut into at least 20,000 documents.

Every stdlib source file (tests included) and every doc text the `python-stdlib` source reads is cut at
blank lines into pieces of about `target_chars`, so the corpus holds both code and prose of realistic
document sizes. The cut is deterministic: the same Python gives the same documents in the same order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmloom.data.documents import Document
from lmloom.data.provenance import SourceLedger
from lmloom.data.stdlib_corpus import StdlibSource, read_stdlib


def _pieces(text: str, target_chars: int) -> list[str]:
    pieces, current, size = [], [], 0
    for block in text.split("\n\n"):
        current.append(block)
        size += len(block) + 2
        if size >= target_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def build_corpus(min_docs: int = 20_000, target_chars: int = 1_200) -> list[dict]:
    """At least `min_docs` documents as {"id", "text", "kind"} dicts (fewer only if Python is tiny)."""
    source = StdlibSource(include_tests=True, max_bytes=None)
    docs: list[dict] = []
    target = target_chars
    while True:
        docs.clear()
        for record in read_stdlib(source, {}, SourceLedger.for_config(source)):
            if not isinstance(record, Document):
                continue
            for i, piece in enumerate(_pieces(record.text, target)):
                docs.append({"id": f"{record.id}#{i}", "text": piece, "kind": record.kind})
        if len(docs) >= min_docs or target <= 200:
            return docs
        target //= 2


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench_corpus.jsonl")
    corpus = build_corpus()
    with out.open("w", encoding="utf-8") as handle:
        for doc in corpus:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"{len(corpus):,} documents, {sum(len(d['text']) for d in corpus):,} characters -> {out}")
