"""Tokenizers: five algorithms in their native formats, one loading interface, the token-shard format,
and training-window loaders.

`load_tokenizer(artifact)` returns a `TextTokenizer` whatever the algorithm (see
`lmloom.tokenizers.base`); `train_tokenizer(algorithm, texts, ...)` trains one.
`lmloom.tokenizers.loader` (windows as torch tensors) is not imported here, so reading shards or
tokenizing does not pay for importing torch; `sentencepiece` is imported only when used.
"""

from lmloom.tokenizers.base import (
    ALGORITHMS,
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    TextTokenizer,
)
from lmloom.tokenizers.bpe import BPETokenizer, save_tokenizer, train_bpe
from lmloom.tokenizers.loading import load_tokenizer
from lmloom.tokenizers.report import tokenizer_report
from lmloom.tokenizers.shards import ShardWriter, TokenShards, read_header, token_dtype
from lmloom.tokenizers.training import train_tokenizer

__all__ = [
    "ALGORITHMS",
    "BOS",
    "BOS_ID",
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "BPETokenizer",
    "ShardWriter",
    "TextTokenizer",
    "TokenShards",
    "load_tokenizer",
    "read_header",
    "save_tokenizer",
    "token_dtype",
    "tokenizer_report",
    "train_bpe",
    "train_tokenizer",
]
