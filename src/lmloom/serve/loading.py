"""Load a verified checkpoint artifact into a model and its tokenizer, ready for generation."""

from __future__ import annotations

from lmloom.artifacts.store import Artifact
from lmloom.errors import LmloomError
from lmloom.models.decoder import Decoder
from lmloom.models.io import model_from_files, refuse_adapter_only
from lmloom.tokenizers.base import TextTokenizer
from lmloom.tokenizers.loading import load_tokenizer


def load_checkpoint_artifact(artifact: Artifact) -> tuple[Decoder, TextTokenizer]:
    if artifact.kind != "checkpoint":
        raise LmloomError(f"artifact {artifact.short_id} is a {artifact.kind}, not a checkpoint")
    refuse_adapter_only(artifact)
    return model_from_files(artifact.read_bytes), load_tokenizer(artifact)
