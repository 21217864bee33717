"""Byte-level BPE: training with Hugging Face `tokenizers`, saving in the format `transformers` loads.

Every string round-trips exactly (`decode(encode(text)) == text`): the ByteLevel pre-tokenizer maps
each UTF-8 byte to a printable symbol, the full 256-byte alphabet is always in the vocabulary, and
there is no normaliser, no prefix space and no whitespace clean-up on decode.

Special tokens have fixed ids, the first three of every vocabulary:

    <|bos|> = 0    <|eos|> = 1    <|pad|> = 2

Encoding never inserts them (no post-processor) and never *recognises* them in text: a document
that contains the string "<|eos|>" is encoded as ordinary characters, so data cannot forge a
document boundary or any other control token. Code that needs a special token adds its id (the shard
encoder appends EOS after every document). The saved `tokenizer_config.json` sets
`split_special_tokens: true` so `transformers` encodes the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmloom.artifacts.atomic import write_text_atomic
from lmloom.errors import ConfigError, LmloomError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in this order
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE  # specials + every byte, no merges

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)


class BPETokenizer:
    """A thin handle on a Hugging Face `Tokenizer` with the calls the rest of lmloom needs."""

    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        # Special-token strings inside text are plain text (see the module docstring).
        self.backend.encode_special_tokens = True
        # encode_batch_fast skips offsets (about 2x faster); older `tokenizers` lack it.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel on the Rust side."""
        return [enc.ids for enc in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are shown as their strings unless skipped."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def save(self, directory: Path | str) -> None:
        save_tokenizer(self.backend, directory)


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
    tokenizer.train_from_iterator(stream, trainer)
    _check_special_ids(tokenizer, "the trained tokenizer")
    return BPETokenizer(tokenizer)


def _check_special_ids(tokenizer: Tokenizer, where: str) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        found = tokenizer.token_to_id(token)
        if found != expected:
            raise LmloomError(f"{where}: special token {token} has id {found}, expected {expected}")


def hf_tokenizer_config() -> dict:
    """`tokenizer_config.json` for `transformers.PreTrainedTokenizerFast.from_pretrained`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,  # byte-level: every input is representable
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<|eos|>" in text stays text, as in BPETokenizer
        "clean_up_tokenization_spaces": False,  # keep decode exact (" ." stays " .")
        "padding_side": "right",
    }


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """The texts of `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`."""
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    return {
        TOKENIZER_FILE: tokenizer.to_str(pretty=False),
        TOKENIZER_CONFIG_FILE: json.dumps(hf_tokenizer_config(), indent=2) + "\n",
        SPECIAL_TOKENS_MAP_FILE: json.dumps(special_map, indent=2) + "\n",
    }


def save_tokenizer(tokenizer: Tokenizer, directory: Path | str) -> None:
    """Write the three tokenizer files into `directory` (a layout transformers loads directly)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(tokenizer).items():
        write_text_atomic(directory / name, text)


def tokenizer_from_json(text: str, where: str) -> BPETokenizer:
    """A tokenizer from the text of a `tokenizer.json` with our special ids; `where` names it in errors."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception for malformed files
        raise LmloomError(f"{where}: not a valid tokenizer file ({exc})") from None
    _check_special_ids(tokenizer, where)
    return BPETokenizer(tokenizer)


def load_tokenizer(directory: Path | str) -> BPETokenizer:
    """Load a tokenizer saved by `save_tokenizer` (or any `tokenizer.json` with our special ids)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise LmloomError(f"no {TOKENIZER_FILE} in {directory}")
    return tokenizer_from_json(path.read_text(encoding="utf-8"), str(path))


def load_tokenizer_artifact(artifact) -> BPETokenizer:
    """The tokenizer stored in an artifact (a tokenizer or a checkpoint), read through its codec."""
    if not artifact.has(TOKENIZER_FILE):
        raise LmloomError(f"artifact {artifact.short_id} ({artifact.kind}) holds no {TOKENIZER_FILE}")
    return tokenizer_from_json(
        artifact.read_text(TOKENIZER_FILE), f"artifact {artifact.short_id}: {TOKENIZER_FILE}"
    )
