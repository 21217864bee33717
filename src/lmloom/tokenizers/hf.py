"""Tokenizers stored as Hugging Face `tokenizer.json` (bpe, wordpiece, unigram): the handle and the files.

The files written next to `tokenizer.json` (`tokenizer_config.json`, `special_tokens_map.json`) make
the directory loadable by `transformers.PreTrainedTokenizerFast.from_pretrained` with the same ids:
`split_special_tokens: true` keeps special-token strings in text as text, as `HFTokenizer` does, and
`clean_up_tokenization_spaces: false` keeps `transformers`' decode equal to ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from lmloom.artifacts.atomic import write_text_atomic
from lmloom.errors import LmloomError
from lmloom.tokenizers.base import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    HF_TOKENIZER_FILE,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)

# The model type inside tokenizer.json -> our algorithm name.
_ALGORITHM_OF_MODEL = {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram"}

# Extra special tokens some algorithms carry after ours (ids 3, 4, ...), by their transformers role.
WORDPIECE_SPECIALS = {
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    # [PAD] is kept for BERT-style tooling; lmloom pads with <|pad|> (id 2), the pad_token below.
    "mask_token": "[MASK]",
}
WORDPIECE_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
UNIGRAM_UNK = "<unk>"


class HFTokenizer:
    """A thin handle on a Hugging Face `Tokenizer` with the calls the rest of lmloom needs."""

    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        # Special-token strings inside text are plain text (see lmloom.tokenizers.base).
        self.backend.encode_special_tokens = True
        # encode_batch_fast skips offsets (about 2x faster); older `tokenizers` lack it.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        model_type = type(backend.model).__name__
        if model_type not in _ALGORITHM_OF_MODEL:
            raise LmloomError(
                f"unsupported tokenizer model {model_type!r} (expected BPE, WordPiece or Unigram)"
            )
        self.algorithm = _ALGORITHM_OF_MODEL[model_type]
        self.unk_id = _unk_id(backend, self.algorithm)

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

    def files(self) -> dict[str, bytes]:
        return {name: text.encode("utf-8") for name, text in hf_files(self.backend, self.algorithm).items()}

    def save(self, directory: Path | str) -> None:
        """Write the tokenizer's files into `directory` (a layout transformers loads directly)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in hf_files(self.backend, self.algorithm).items():
            write_text_atomic(directory / name, text)


def _unk_id(backend: Tokenizer, algorithm: str) -> int | None:
    if algorithm == "unigram":
        # The Python Unigram model does not expose its unk id; the serialised model does.
        return json.loads(backend.to_str())["model"].get("unk_id")
    unk = getattr(backend.model, "unk_token", None)
    return backend.token_to_id(unk) if unk else None


def extra_special_tokens(algorithm: str) -> dict[str, str]:
    """transformers roles -> tokens an algorithm has besides <|bos|>, <|eos|>, <|pad|>."""
    if algorithm == "wordpiece":
        return dict(WORDPIECE_SPECIALS)
    if algorithm == "unigram":
        return {"unk_token": UNIGRAM_UNK}
    return {}


def hf_tokenizer_config(algorithm: str = "bpe") -> dict:
    """`tokenizer_config.json` for `transformers.PreTrainedTokenizerFast.from_pretrained`."""
    extra = extra_special_tokens(algorithm)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": extra.pop("unk_token", None),  # None for byte-level: every input is representable
        **extra,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<|eos|>" in text stays text, as in HFTokenizer
        "clean_up_tokenization_spaces": False,  # keep decode equal to the backend's (" ." stays " .")
        "padding_side": "right",
    }
    return config


def hf_files(tokenizer: Tokenizer, algorithm: str = "bpe") -> dict[str, str]:
    """The texts of `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`."""
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, **extra_special_tokens(algorithm)}
    return {
        HF_TOKENIZER_FILE: tokenizer.to_str(pretty=False),
        TOKENIZER_CONFIG_FILE: json.dumps(hf_tokenizer_config(algorithm), indent=2) + "\n",
        SPECIAL_TOKENS_MAP_FILE: json.dumps(special_map, indent=2) + "\n",
    }


def check_special_ids(tokenizer: Tokenizer, where: str) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        found = tokenizer.token_to_id(token)
        if found != expected:
            raise LmloomError(f"{where}: special token {token} has id {found}, expected {expected}")


def hf_tokenizer_from_json(text: str, where: str) -> HFTokenizer:
    """A tokenizer from the text of a `tokenizer.json` with our special ids; `where` names it in errors."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception for malformed files
        raise LmloomError(f"{where}: not a valid tokenizer file ({exc})") from None
    check_special_ids(tokenizer, where)
    return HFTokenizer(tokenizer)
