"""Load a verified checkpoint artifact into a model and its tokenizer, ready for generation."""

from __future__ import annotations

from lmloom.artifacts.store import Artifact
from lmloom.errors import LmloomError
from lmloom.models.decoder import Decoder
from lmloom.models.io import model_from_files
from lmloom.tokenizers.base import TextTokenizer
from lmloom.tokenizers.loading import load_tokenizer


def load_checkpoint_artifact(artifact: Artifact) -> tuple[Decoder, TextTokenizer]:
    if artifact.kind != "checkpoint":
        raise LmloomError(f"artifact {artifact.short_id} is a {artifact.kind}, not a checkpoint")
    if artifact.manifest.metadata.get("adapter_only"):  # its model files are the base, unchanged
        raise LmloomError(
            f"checkpoint {artifact.short_id} is a prefix-tuning adapter: its model files are the base model and "
            "the prefix is only in its PEFT adapter files, which lmloom's inference does not apply (so it "
            "would run the base); load it with transformers + peft, or tune with LoRA or full fine-tuning"
        )
    return model_from_files(artifact.read_bytes), load_tokenizer(artifact)
