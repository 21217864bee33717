"""Tokenizers: byte-level BPE training, the token-shard format, and training-window loaders.

`lmloom.tokenizers.loader` (windows as torch tensors) is not imported here, so reading shards or
tokenizing does not pay for importing torch.
"""

from lmloom.tokenizers.bpe import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    BPETokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)
from lmloom.tokenizers.shards import ShardWriter, TokenShards, read_header, token_dtype

__all__ = [
    "BOS",
    "BOS_ID",
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "BPETokenizer",
    "ShardWriter",
    "TokenShards",
    "load_tokenizer",
    "read_header",
    "save_tokenizer",
    "token_dtype",
    "train_bpe",
]
