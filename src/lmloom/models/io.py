"""Model directories: `model.safetensors` + `model.json` (the config), loadable without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from lmloom.models.decoder import Decoder, DecoderConfig

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def save_model_dir(model: Decoder, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS))  # tied embedding stored once
    payload = {"architecture": "decoder", "config": model.config.model_dump(mode="json")}
    (directory / CONFIG).write_text(json.dumps(payload, indent=2))


def load_model_dir(directory: Path, device: str | torch.device = "cpu") -> Decoder:
    payload = json.loads((Path(directory) / CONFIG).read_text())
    config = DecoderConfig.model_validate(payload["config"])
    model = Decoder(config).to(device)
    load_model(model, str(Path(directory) / WEIGHTS), device=str(device))
    return model.eval()
