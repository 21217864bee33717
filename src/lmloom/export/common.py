"""What the export stages share: loading the checkpoint, its files, scratch files, validation data."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmloom.errors import ConfigError
from lmloom.models.decoder import Decoder
from lmloom.models.io import model_from_files
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES, TOKENIZER_CONFIG_FILE, TextTokenizer
from lmloom.tokenizers.loading import load_tokenizer

SHARDS = "shards"  # the optional input role of validation shards


def load_checkpoint(artifact) -> tuple[Decoder, TextTokenizer]:
    """The checkpoint's model (eval mode, float32, CPU) and tokenizer, read through the verified artifact."""
    if artifact.kind != "checkpoint":
        raise ConfigError(f"artifact {artifact.short_id} is a {artifact.kind}, not a checkpoint")
    return model_from_files(artifact.read_bytes).float().eval(), load_tokenizer(artifact)


def copy_tokenizer_files(
    checkpoint, tokenizer: TextTokenizer, out, config_extra: dict | None = None
) -> list[str]:
    """Copy the checkpoint's tokenizer files; add any the tokenizer's own format has that it lacks.
    `config_extra` adds fields to `tokenizer_config.json` (e.g. the chat template)."""
    written = []
    for name in ALL_TOKENIZER_FILES:
        if checkpoint.has(name):
            if name == TOKENIZER_CONFIG_FILE and config_extra:
                out.write_bytes(name, _with_fields(checkpoint.read_bytes(name), config_extra))
            else:
                out.copy_from(checkpoint, name)
            written.append(name)
    for name, data in tokenizer.files().items():
        if name not in written:
            if name == TOKENIZER_CONFIG_FILE and config_extra:
                data = _with_fields(data, config_extra)
            out.write_bytes(name, data)
            written.append(name)
    return sorted(written)


def _with_fields(config_json: bytes, fields: dict) -> bytes:
    return (json.dumps({**json.loads(config_json), **fields}, indent=2) + "\n").encode("utf-8")


@contextmanager
def scratch_dir(ctx) -> Iterator[Path]:
    """A private temporary directory in the stage's work dir, removed afterwards (libraries that only
    write to paths: gguf's writer, onnxruntime's quantiser). Their output reaches the artifact through
    the store's writer, so it is encrypted there when the run encrypts."""
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="export-", dir=ctx.work_dir))
    path.chmod(0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def copy_file_into(out, name: str, path: Path) -> None:
    with path.open("rb") as src, out.open(name) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def validation_shards(checkpoint, inputs, ctx):
    """Token shards to measure validation loss on: the `shards` input, else the shards the checkpoint
    was trained on (by its lineage, opened and verified like any input), else None."""
    if SHARDS in inputs:
        shards = inputs[SHARDS]
        trained_with = checkpoint.manifest.metadata.get("tokenizer")
        encoded_with = shards.manifest.inputs.get("tokenizer")
        if trained_with and encoded_with and trained_with != encoded_with:
            raise ConfigError(
                f"stages.{ctx.step}.inputs.{SHARDS}: shards {shards.short_id} were encoded with tokenizer "
                f"{encoded_with[:12]}, checkpoint {checkpoint.short_id} uses {trained_with[:12]}"
            )
        return shards
    ref = checkpoint.manifest.inputs.get(SHARDS)
    if ref and ref in ctx.store.ids():  # a checkpoint brought from elsewhere may lack its data here
        return ctx.store.open(ref)  # verified (and signature-checked) like any input
    return None
