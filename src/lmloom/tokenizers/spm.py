"""SentencePiece tokenizers (BPE and unigram): trained in memory, saved as the native `tokenizer.model`.

Settings chosen so that decoding is exact and nothing is unknown:

- `normalization_rule_name="identity"`, no dummy prefix, no whitespace clean-up: the text is not
  changed before segmentation, so `decode(encode(text)) == text` for every text that holds no
  literal "▁" (U+2581, SentencePiece's space symbol, which decodes to a space);
- `byte_fallback=True`: a character outside the vocabulary is encoded as its UTF-8 bytes (the
  pieces <0x00> ... <0xFF>), so <unk> (id 3) never appears.

<|bos|> <|eos|> <|pad|> are SentencePiece's own bos/eos/pad *control* symbols with ids 0, 1, 2.
Control symbols are never matched in text (unlike user-defined symbols), which keeps lmloom's rule
that a document cannot forge a special token. SentencePiece's decode drops control symbols; ours
shows them as their strings unless `skip_special_tokens`, like the Hugging Face tokenizers.

Training reads one sentence per line of text (SentencePiece's unit; lines longer than 4,192 bytes are
skipped by the trainer) from an iterator and writes the model into memory: no plaintext temp files.
The `sentencepiece` package is imported only when a SentencePiece tokenizer is trained or loaded.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from lmloom.errors import ConfigError, DataError, LmloomError
from lmloom.tokenizers.base import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    SENTENCEPIECE_MODEL_FILE,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)

UNK = "<unk>"
UNK_ID = 3
MODEL_TYPES = ("bpe", "unigram")
# TrainerSpec.model_type in sentencepiece_model.proto; an absent field means UNIGRAM.
_MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError:  # an optional dependency: only these two algorithms need it
        raise LmloomError(
            "SentencePiece tokenizers need the `sentencepiece` package (pip install sentencepiece)"
        ) from None
    return sentencepiece


class SentencePieceTokenizer:
    """A SentencePiece model with lmloom's tokenizer interface."""

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID

    def __init__(self, model_proto: bytes, where: str = "SentencePiece model"):
        try:
            self.processor = _sentencepiece().SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as exc:
            raise LmloomError(f"{where}: not a valid SentencePiece model ({exc})") from None
        for expected, token in enumerate((*SPECIAL_TOKENS, UNK)):
            if self.processor.get_piece_size() <= expected or self.processor.id_to_piece(expected) != token:
                raise LmloomError(f"{where}: piece {expected} is not {token}")
        self.model_proto = model_proto
        self.algorithm = f"sentencepiece-{sentencepiece_model_type(model_proto)}"
        self._specials = {i: token for i, token in enumerate(SPECIAL_TOKENS)}

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts)) if texts else []

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are shown as their strings unless skipped."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.processor.decode([i for i in ids if i not in self._specials])
        # Decode the runs between special tokens and put the special strings between them.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self._specials:
                parts += [self.processor.decode(run), self._specials[token_id]]
                run = []
            else:
                run.append(token_id)
        parts.append(self.processor.decode(run))
        return "".join(parts)

    def token(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def files(self) -> dict[str, bytes]:
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
        return {
            SENTENCEPIECE_MODEL_FILE: self.model_proto,
            TOKENIZER_CONFIG_FILE: (json.dumps(transformers_config(), indent=2) + "\n").encode(),
            SPECIAL_TOKENS_MAP_FILE: (json.dumps(special_map, indent=2) + "\n").encode(),
        }


def transformers_config() -> dict:
    """`tokenizer_config.json` for `transformers.LlamaTokenizer` (it converts `tokenizer.model` on load).

    transformers >= 5 rebuilds the model as a Hugging Face BPE tokenizer: ids are identical for
    SentencePiece BPE; for SentencePiece unigram the segmentation may differ (decoding still agrees).
    """
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,  # our models have no dummy prefix
        "legacy": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
    }


# The trainer's default max_sentence_length: longer lines are skipped (they are counted here, so a
# text made only of such lines is a clear error, not the trainer's "!sentences_.empty()").
MAX_SENTENCE_BYTES = 4192


def _sentences(texts: Iterable[str], counter: dict[str, int]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line:
                counter["sentences"] += 1
                if len(line) * 4 > MAX_SENTENCE_BYTES and len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                    counter["too_long"] += 1
                yield line


def train_sentencepiece(
    texts: Iterable[str], *, vocab_size: int, model_type: str, threads: int | None = None
) -> SentencePieceTokenizer:
    """Train a SentencePiece model ("bpe" or "unigram") of `vocab_size` pieces, bytes and specials included.

    The limit is soft: a small corpus may give fewer pieces. Too small a `vocab_size` for the
    specials, the 256 bytes and the corpus' characters is a ConfigError.
    """
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type = {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    spm = _sentencepiece()
    model = io.BytesIO()
    counter = {"sentences": 0, "too_long": 0}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts, counter),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # runs of indentation become single pieces
            split_digits=False,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            unk_piece=UNK,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,  # errors only: the trainer's progress log would flood the stage output
        )
    except RuntimeError as exc:
        if counter["sentences"] == 0:
            raise DataError("no text to train a SentencePiece model on") from None
        if counter["too_long"] == counter["sentences"]:
            raise DataError(
                f"no line of the training text is short enough for SentencePiece: all "
                f"{counter['sentences']:,} lines are longer than {MAX_SENTENCE_BYTES:,} bytes, and the "
                "trainer skips such lines; break the text into lines, or use algorithm bpe or unigram"
            ) from None
        raise ConfigError(f"SentencePiece training failed: {exc}") from None
    return SentencePieceTokenizer(model.getvalue(), "the trained SentencePiece model")


# -- reading the model type from the serialised ModelProto -------------------------------------------
# The `sentencepiece` Python API does not expose the model type, and its protobuf module needs the
# `protobuf` package; the two fields we need are easy to read from the wire format directly.


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise LmloomError("SentencePiece model: truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            yield number, data[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):  # fixed64 / fixed32 (e.g. float scores): skip
            pos += 8 if wire_type == 1 else 4
        else:
            raise LmloomError(f"SentencePiece model: unexpected wire type {wire_type}")


def sentencepiece_model_type(model_proto: bytes) -> str:
    """ "bpe", "unigram", "word" or "char": TrainerSpec.model_type (field 3 of field 2) of a ModelProto."""
    for number, value in _fields(model_proto):
        if number == 2 and isinstance(value, bytes):  # trainer_spec
            for inner, model_type in _fields(value):
                if inner == 3 and isinstance(model_type, int):
                    return _MODEL_TYPE_NAMES.get(model_type, f"type-{model_type}")
    return "unigram"  # proto2 default
