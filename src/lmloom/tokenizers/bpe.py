"""Byte-level BPE: training with Hugging Face `tokenizers`, saving in the format `transformers` loads.

Every string round-trips exactly (`decode(encode(text)) == text`): the ByteLevel pre-tokenizer maps
each UTF-8 byte to a printable symbol, the full 256-byte alphabet is always in the vocabulary, and
there is no normaliser, no prefix space and no whitespace clean-up on decode.

Special tokens have fixed ids, the first three of every vocabulary (see `lmloom.tokenizers.base`):

    <|bos|> = 0    <|eos|> = 1    <|pad|> = 2

Encoding never inserts them (no post-processor) and never *recognises* them in text: a document
that contains the string "<|eos|>" is encoded as ordinary characters, so data cannot forge a
document boundary or any other control token. Code that needs a special token adds its id (the shard
encoder appends EOS after every document). The saved `tokenizer_config.json` sets
`split_special_tokens: true` so `transformers` encodes the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmloom.errors import ConfigError, LmloomError
from lmloom.tokenizers.base import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)
from lmloom.tokenizers.base import HF_TOKENIZER_FILE as TOKENIZER_FILE
from lmloom.tokenizers.hf import HFTokenizer, check_special_ids, hf_files, hf_tokenizer_from_json
from lmloom.tokenizers.hf import hf_tokenizer_config as config_of

# Re-exported: the special tokens and file names lived here before lmloom.tokenizers.base.
__all__ = [
    "BOS",
    "BOS_ID",
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "TOKENIZER_FILES",
    "BPETokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "train_bpe",
]

BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE  # specials + every byte, no merges

TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)

# The byte-level BPE handle is the generic tokenizer.json handle; the name stays for existing callers.
BPETokenizer = HFTokenizer


def new_bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline: no normaliser, ByteLevel pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def capped_texts(texts: Iterable[str], max_bytes: int, stats: dict[str, int] | None = None) -> Iterator[str]:
    """Yield texts until `max_bytes` UTF-8 bytes are out; the text that crosses the cap is cut to fit.

    `stats` (if given) receives the running totals `bytes` and `documents` of what was yielded.
    """
    stats = stats if stats is not None else {}
    stats.update(bytes=0, documents=0)
    budget = max_bytes
    if budget <= 0:
        return
    for text in texts:
        data = text.encode("utf-8")
        if len(data) > budget:
            # Cut on a character boundary: drop the partial character at the end.
            text = data[:budget].decode("utf-8", errors="ignore")
            data = text.encode("utf-8")
            budget = 0
        else:
            budget -= len(data)
        stats["bytes"] += len(data)
        stats["documents"] += 1
        yield text
        if budget <= 0:
            return


# The Hugging Face BPE (and WordPiece) trainers take time quadratic in the length of a word made of
# one repeated pair ("=====...", a run of spaces, "0000..."): one 5 MB line of them stalls training
# for hours. No real word is this long, so for training only such runs are cut into pieces of at
# most this many characters; encoding is unchanged, and so is training on text without such runs.
MAX_TRAIN_RUN = 1024
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAIN_RUN + 1},}}|\s{{{MAX_TRAIN_RUN + 1},}}")


def bounded_runs(texts: Iterable[str]) -> Iterator[str]:
    """The texts, each run of over MAX_TRAIN_RUN non-space (or space) characters split off into
    separate texts of at most MAX_TRAIN_RUN characters, so no word a trainer sees is longer."""
    for text in texts:
        start = 0
        for match in _LONG_RUN.finditer(text):
            if match.start() > start:
                yield text[start : match.start()]
            for cut in range(match.start(), match.end(), MAX_TRAIN_RUN):
                yield text[cut : min(cut + MAX_TRAIN_RUN, match.end())]
            start = match.end()
        if start == 0:
            yield text
        elif start < len(text):
            yield text[start:]


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    max_train_bytes: int | None = None,
    stats: dict[str, int] | None = None,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer on a stream of texts (at most `max_train_bytes` of them).

    The vocabulary holds the special tokens (ids 0-2), all 256 bytes, then merges until `vocab_size`;
    a small corpus may run out of pairs seen `min_frequency` times and stop below `vocab_size`.
    Training is deterministic: the same texts and settings give the same `tokenizer.json`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size = {vocab_size}: must be at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special tokens + {BYTE_ALPHABET_SIZE} bytes)"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency = {min_frequency}: must be at least 1")
    tokenizer = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stream = capped_texts(texts, max_train_bytes, stats) if max_train_bytes is not None else texts
    tokenizer.train_from_iterator(bounded_runs(stream), trainer)
    _check_special_ids(tokenizer, "the trained tokenizer")
    return BPETokenizer(tokenizer)


def _check_special_ids(tokenizer: Tokenizer, where: str) -> None:
    check_special_ids(tokenizer, where)


def hf_tokenizer_config() -> dict:
    """`tokenizer_config.json` of a byte-level BPE tokenizer (see `lmloom.tokenizers.hf`)."""
    return config_of("bpe")


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """The texts of `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`."""
    return hf_files(tokenizer, "bpe")


def save_tokenizer(tokenizer: Tokenizer, directory: Path | str) -> None:
    """Write the three tokenizer files into `directory` (a layout transformers loads directly)."""
    HFTokenizer(tokenizer).save(directory)


def tokenizer_from_json(text: str, where: str) -> HFTokenizer:
    """A tokenizer from the text of a `tokenizer.json` with our special ids; `where` names it in errors."""
    return hf_tokenizer_from_json(text, where)


def load_tokenizer(directory: Path | str) -> HFTokenizer:
    """Load a `tokenizer.json` with our special ids from a plain directory (not an artifact).

    Artifacts are read with `lmloom.tokenizers.load_tokenizer`, which verifies and decrypts, and
    also loads SentencePiece models.
    """
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise LmloomError(f"no {TOKENIZER_FILE} in {directory}")
    return tokenizer_from_json(path.read_text(encoding="utf-8"), str(path))
