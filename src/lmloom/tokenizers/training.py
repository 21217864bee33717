"""One entry point that trains any of the five tokenizer algorithms on a stream of texts."""

from __future__ import annotations

from collections.abc import Iterable

from lmloom.errors import ConfigError
from lmloom.tokenizers.base import ALGORITHMS, TextTokenizer


def train_tokenizer(
    algorithm: str, texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2
) -> TextTokenizer:
    """Train `algorithm` (one of ALGORITHMS) on `texts`.

    `min_frequency` applies to the merge/word-piece learners (bpe, wordpiece); the unigram and
    SentencePiece trainers prune by likelihood instead and ignore it.
    """
    if algorithm == "bpe":
        from lmloom.tokenizers.bpe import train_bpe

        return train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    if algorithm == "wordpiece":
        from lmloom.tokenizers.wordpiece import train_wordpiece

        return train_wordpiece(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    if algorithm == "unigram":
        from lmloom.tokenizers.unigram import train_unigram

        return train_unigram(texts, vocab_size=vocab_size)
    if algorithm in ("sentencepiece-bpe", "sentencepiece-unigram"):
        from lmloom.tokenizers.spm import train_sentencepiece

        return train_sentencepiece(texts, vocab_size=vocab_size, model_type=algorithm.split("-", 1)[1])
    raise ConfigError(f"algorithm = {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
