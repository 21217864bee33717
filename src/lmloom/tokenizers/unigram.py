"""Unigram language-model tokenizer with byte fallback: Hugging Face `tokenizers`, saved as `tokenizer.json`.

Pre-tokenisation splits text SentencePiece-style into words that carry at most one leading space
and runs of spaces (indentation stays one piece, not one per space), then Metaspace turns spaces
into "▁" (no prefix space added). There is no normaliser, so decoding is exact for every text that holds no literal "▁" (U+2581,
which decodes to a space). A character the vocabulary lacks is encoded as its UTF-8 bytes, the
pieces <0x00> ... <0xFF>, so nothing is unknown.

Vocabulary: <|bos|> <|eos|> <|pad|> (ids 0-2), <unk> (3), the 256 byte pieces (4-259), then the
learned pieces: the same layout as the SentencePiece models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmloom.errors import ConfigError, DataError, LmloomError
from lmloom.tokenizers.base import SPECIAL_TOKENS
from lmloom.tokenizers.hf import UNIGRAM_UNK, HFTokenizer, check_special_ids

BYTE_PIECES = tuple(f"<0x{byte:02X}>" for byte in range(256))
FIXED_PIECES = (*SPECIAL_TOKENS, UNIGRAM_UNK)
MIN_VOCAB_SIZE = len(FIXED_PIECES) + len(BYTE_PIECES) + 1
# The segmenter must never pick a byte or special piece for literal text such as "<0x41>" or
# "<|eos|>". Their characters are always in the alphabet (FIXED_ALPHABET), each scoring at least
# `lowest`, so any text of at most _LONGEST_FIXED_PIECE characters has a path scoring at least
# _LONGEST_FIXED_PIECE * lowest; the fixed pieces score below that. Byte pieces still serve as fallback.
FIXED_ALPHABET = sorted(set("".join((*FIXED_PIECES, *BYTE_PIECES))))
_LONGEST_FIXED_PIECE = max(len(piece) for piece in (*FIXED_PIECES, *BYTE_PIECES))


# " +(?= )": a run of spaces but its last one, which starts the next word (" ?[^ ]+");
# " +" catches trailing spaces. On Python code this gives ~45% more bytes per token than Metaspace's
# own split, which makes every space of an indentation a piece of its own.
_WORDS_AND_SPACE_RUNS = Regex(r" +(?= )| ?[^ ]+| +")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_WORDS_AND_SPACE_RUNS, behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
        ]
    )


def _counted(texts: Iterable[str], counter: dict[str, int]) -> Iterator[str]:
    for text in texts:
        counter["chars"] += len(text)
        yield text


def train_unigram(texts: Iterable[str], *, vocab_size: int) -> HFTokenizer:
    """Train a Unigram model of `vocab_size - 256` pieces, then add the 256 byte pieces for fallback."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size = {vocab_size}: Unigram with byte fallback needs at least {MIN_VOCAB_SIZE}"
        )
    learner = Tokenizer(models.Unigram())
    learner.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES),
        special_tokens=list(FIXED_PIECES),
        unk_token=UNIGRAM_UNK,
        initial_alphabet=FIXED_ALPHABET,
        show_progress=False,
    )
    counter = {"chars": 0}
    try:
        learner.train_from_iterator(_counted(texts, counter), trainer)
    except Exception as exc:  # noqa: BLE001  (the trainer raises a bare "... not large enough to contain all chars")
        if isinstance(exc, LmloomError) or "not large enough" not in str(exc):
            raise
        raise ConfigError(
            f"vocab_size = {vocab_size}: too small for this text: Unigram needs a piece for every "
            f"distinct character of it on top of the {len(FIXED_PIECES)} fixed and {len(BYTE_PIECES)} "
            "byte pieces; raise vocab_size"
        ) from None
    if counter["chars"] == 0:  # the trainer then returns pieces without scores
        raise DataError("no text to train a Unigram model on")
    # The trainer cannot add byte pieces itself: rebuild the model with them after the fixed pieces.
    learned = [(piece, score) for piece, score in json.loads(learner.to_str())["model"]["vocab"]]
    learned = [(p, s) for p, s in learned if p not in FIXED_PIECES and p not in BYTE_PIECES]
    lowest = min((s for _, s in learned), default=0.0)
    floor = (_LONGEST_FIXED_PIECE + 1) * (lowest - 1.0)
    vocab = [(piece, floor) for piece in (*FIXED_PIECES, *BYTE_PIECES)] + learned
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=FIXED_PIECES.index(UNIGRAM_UNK), byte_fallback=True))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens(list(FIXED_PIECES))
    check_special_ids(tokenizer, "the trained Unigram tokenizer")
    return HFTokenizer(tokenizer)
