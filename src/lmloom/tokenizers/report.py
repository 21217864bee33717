"""The tokenizer report: how well a trained tokenizer fits held-out text.

Measured on a sample of documents (the corpus' validation split, or its training split when
validation is empty):

- bytes per token: UTF-8 bytes of the sample / tokens it encodes to (higher = shorter sequences);
- unknown-token rate: share of the sample's tokens that are the unknown token (0 when there is none);
- round-trip share: share of documents for which `decode(encode(text)) == text` exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from lmloom.tokenizers.base import TextTokenizer

_BATCH = 256  # documents per encode_batch call


def tokenizer_report(tokenizer: TextTokenizer, texts: Iterable[str]) -> dict:
    """The report's counts and ratios for `texts`; the ratios are None when the sample is empty."""
    counts = {"bytes": 0, "documents": 0, "tokens": 0, "unknown_tokens": 0, "round_trip_documents": 0}
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, _BATCH)):
        for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            counts["bytes"] += len(text.encode("utf-8"))
            counts["documents"] += 1
            counts["tokens"] += len(ids)
            if tokenizer.unk_id is not None:
                counts["unknown_tokens"] += sum(1 for i in ids if i == tokenizer.unk_id)
            # Decoding with specials shown: encode never produces them, so this is the plain text.
            counts["round_trip_documents"] += tokenizer.decode(ids) == text
    tokens, documents = counts["tokens"], counts["documents"]
    return {
        "bytes_per_token": round(counts["bytes"] / tokens, 4) if tokens else None,
        "unk_rate": round(counts["unknown_tokens"] / tokens, 6) if tokens else None,
        "round_trip_share": round(counts["round_trip_documents"] / documents, 4) if documents else None,
        **counts,
    }
