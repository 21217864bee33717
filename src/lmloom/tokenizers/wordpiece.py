"""BERT-style WordPiece: training with Hugging Face `tokenizers`, saved as `tokenizer.json`.

The pipeline is BERT's: the BERT normaliser (clean control characters, split CJK characters, strip
accents, lowercase), the BERT pre-tokenizer (split on whitespace and punctuation) and the WordPiece
decoder (join words with spaces, glue `##` continuations). Decoding is therefore *not* exact: it
returns the normalised text, lowercased, without accents or control characters, with one space
between words and around punctuation. Characters never seen in training become [UNK].

Vocabulary: <|bos|> <|eos|> <|pad|> (ids 0-2, ours), then [UNK] [CLS] [SEP] [PAD] [MASK] (ids 3-7,
for BERT-style tooling), then the alphabet and learned word pieces.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmloom.errors import ConfigError
from lmloom.tokenizers.base import SPECIAL_TOKENS
from lmloom.tokenizers.bpe import bounded_runs
from lmloom.tokenizers.hf import WORDPIECE_SPECIALS, WORDPIECE_TOKENS, HFTokenizer, check_special_ids

MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(WORDPIECE_TOKENS) + 1  # at least one ordinary token


def new_wordpiece_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIALS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def train_wordpiece(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train WordPiece on a stream of texts; the vocabulary may stop below `vocab_size` on little text."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size = {vocab_size}: WordPiece needs at least {MIN_VOCAB_SIZE}")
    tokenizer = new_wordpiece_tokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *WORDPIECE_TOKENS],
        show_progress=False,
    )
    # the WordPiece trainer is BPE's underneath, just as slow on one enormous word
    tokenizer.train_from_iterator(bounded_runs(texts), trainer)
    check_special_ids(tokenizer, "the trained WordPiece tokenizer")
    return HFTokenizer(tokenizer)
