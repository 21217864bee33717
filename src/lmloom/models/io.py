"""Model files: `model.safetensors` + `model.json` (the config), loadable without pickle.

`model_files` / `model_from_files` work on bytes so the same code writes a plain directory or an
(encrypted) artifact; `save_model_dir` / `load_model_dir` are the directory shorthands.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lmloom.errors import ConfigError
from lmloom.models.decoder import Decoder, DecoderConfig

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def model_files(model: Decoder) -> dict[str, bytes]:
    # The tied LM head is the embedding (no separate parameter), so the state dict has no aliases.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    payload = {"architecture": "decoder", "config": model.config.model_dump(mode="json")}
    return {WEIGHTS: save_safetensors(state), CONFIG: json.dumps(payload, indent=2).encode("utf-8")}


def refuse_adapter_only(checkpoint) -> None:
    """A prefix-tuned checkpoint's model files are its base, unchanged: the prefix lives only in its PEFT
    adapter files, which lmloom applies nowhere it loads a model, so any use would silently be the base's."""
    if checkpoint.manifest.metadata.get("adapter_only"):
        raise ConfigError(
            f"checkpoint {checkpoint.short_id} is a prefix-tuning adapter: its model files are the base model "
            "and the prefix is only in its PEFT adapter files, which lmloom's inference does not apply, nor its "
            "training (either would use the base); load it with transformers + peft, or use a full or LoRA "
            "checkpoint"
        )


def model_from_files(read_bytes: Callable[[str], bytes], device: str | torch.device = "cpu") -> Decoder:
    payload = json.loads(read_bytes(CONFIG))
    model = Decoder(DecoderConfig.model_validate(payload["config"]))
    model.load_state_dict(load_safetensors(read_bytes(WEIGHTS)))
    return model.to(device).eval()


def save_model_dir(model: Decoder, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in model_files(model).items():
        (directory / name).write_bytes(data)


def load_model_dir(directory: Path, device: str | torch.device = "cpu") -> Decoder:
    return model_from_files(lambda name: (Path(directory) / name).read_bytes(), device)
