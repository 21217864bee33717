"""The files of a (non-sharded) Hugging Face model directory, read and written the same way for every
architecture: config.json and model.safetensors. Never pickle: a directory without model.safetensors
is refused rather than read through `torch.load`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"


def read_hf_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json as a dict, the HF-named tensors of model.safetensors)."""
    path = Path(path)
    config = json.loads((path / HF_CONFIG).read_text(encoding="utf-8"))
    weights = path / HF_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found (only a single model.safetensors is read, never pickle)"
        )
    return config, load_file(weights)


def write_hf_dir(path: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write config.json and model.safetensors (tensors made contiguous) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    # metadata "pt": transformers checks it to know the tensors were saved from PyTorch.
    save_file(tensors, str(path / HF_WEIGHTS), metadata={"format": "pt"})
