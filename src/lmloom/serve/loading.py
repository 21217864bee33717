"""Load a verified checkpoint artifact into a model and its tokenizer, ready for generation."""

from __future__ import annotations

from lmloom.artifacts.store import Artifact
from lmloom.errors import LmloomError
from lmloom.models.decoder import Decoder
from lmloom.models.io import load_model_dir
from lmloom.tokenizers.bpe import load_tokenizer


def load_checkpoint_artifact(artifact: Artifact) -> tuple[Decoder, object]:
    if artifact.kind != "checkpoint":
        raise LmloomError(f"artifact {artifact.short_id} is a {artifact.kind}, not a checkpoint")
    return load_model_dir(artifact.path), load_tokenizer(artifact.path)
