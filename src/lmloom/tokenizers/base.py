"""What every lmloom tokenizer offers, whatever its algorithm and its file format.

Five algorithms, two native formats:

    bpe                     byte-level BPE            tokenizer.json   (Hugging Face `tokenizers`)
    wordpiece               BERT-style WordPiece      tokenizer.json
    unigram                 Unigram LM, byte fallback tokenizer.json
    sentencepiece-bpe       SentencePiece BPE         tokenizer.model  (the `sentencepiece` library)
    sentencepiece-unigram   SentencePiece unigram     tokenizer.model

All of them put the special tokens first, with fixed ids: <|bos|> = 0, <|eos|> = 1, <|pad|> = 2.
Encoding never inserts special tokens and never recognises their strings in text, so a document
cannot forge a document boundary: code that needs one adds its id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in this order
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

ALGORITHMS = ("bpe", "wordpiece", "unigram", "sentencepiece-bpe", "sentencepiece-unigram")

HF_TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# Every file any algorithm may write; a checkpoint copies those its tokenizer artifact holds.
ALL_TOKENIZER_FILES = (
    HF_TOKENIZER_FILE,
    SENTENCEPIECE_MODEL_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
)


@runtime_checkable
class TextTokenizer(Protocol):
    """Text <-> token ids, the one interface the stages, training and generation use."""

    algorithm: str  # one of ALGORITHMS
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None  # None: every text is representable, no unknown token exists

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def token(self, token_id: int) -> str | None:
        """The vocabulary entry (piece) of an id."""
        ...

    def files(self) -> dict[str, bytes]:
        """The tokenizer's files in its native format (name -> content), as an artifact stores them."""
        ...


class FileSource(Protocol):
    """Where tokenizer files are read from: an `Artifact` (verified, maybe encrypted) or a `LocalDir`."""

    def has(self, name: str) -> bool: ...

    def read_bytes(self, name: str) -> bytes: ...

    def read_text(self, name: str) -> str: ...
