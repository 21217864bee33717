"""`load_tokenizer`: the tokenizer in an artifact (tokenizer or checkpoint) or a directory, any algorithm.

The file present decides the format: `tokenizer.json` is a Hugging Face tokenizer (bpe, wordpiece,
unigram; the model type inside says which), `tokenizer.model` a SentencePiece model. Artifact files
are read through the artifact's own API, which verifies their hashes and decrypts them.
"""

from __future__ import annotations

from pathlib import Path

from lmloom.artifacts.files import LocalDir
from lmloom.errors import LmloomError
from lmloom.tokenizers.base import HF_TOKENIZER_FILE, SENTENCEPIECE_MODEL_FILE, FileSource, TextTokenizer


def _describe(source: FileSource) -> str:
    """How errors name the source: "artifact 1a2b3c (tokenizer)" or the directory's path."""
    name = getattr(source, "short_id", None) or str(source)
    kind = getattr(source, "kind", None)  # artifacts have a kind, a LocalDir does not
    return f"artifact {name} ({kind})" if kind else str(name)


def load_tokenizer(source: FileSource | Path | str) -> TextTokenizer:
    """The tokenizer stored in `source`: an `Artifact`, a `LocalDir`, or a plain directory path."""
    if isinstance(source, (str, Path)):
        source = LocalDir(source)
    where = _describe(source)
    if source.has(HF_TOKENIZER_FILE):
        from lmloom.tokenizers.hf import hf_tokenizer_from_json

        return hf_tokenizer_from_json(source.read_text(HF_TOKENIZER_FILE), f"{where}: {HF_TOKENIZER_FILE}")
    if source.has(SENTENCEPIECE_MODEL_FILE):
        from lmloom.tokenizers.spm import SentencePieceTokenizer

        return SentencePieceTokenizer(
            source.read_bytes(SENTENCEPIECE_MODEL_FILE), f"{where}: {SENTENCEPIECE_MODEL_FILE}"
        )
    raise LmloomError(f"{where} holds no tokenizer ({HF_TOKENIZER_FILE} or {SENTENCEPIECE_MODEL_FILE})")
