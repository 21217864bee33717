"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, all verified.

A checkpoint is a directory `step-00000123/` holding

    model.safetensors      model weights
    optimizer.safetensors  optimizer state tensors, keyed `state.<param index>.<name>`
    state.json             step, data position, optimizer param groups, RNG states, counters
    checksums.json         sha256 of the three files above

written to a temp directory and renamed into place, so a crash (even `kill -9`) leaves either the
whole checkpoint or none of it. Loading refuses a checkpoint whose files do not match checksums.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lmloom.artifacts.atomic import fsync_dir, fsync_tree
from lmloom.artifacts.hashing import sha256_file
from lmloom.errors import IntegrityError

PREFIX = "step-"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps completed
    sample: int = 0  # next training sample index of the window loader
    tokens: int = 0  # training tokens consumed
    extra: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "sample": self.sample, "tokens": self.tokens, "extra": self.extra or {}}


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    keep: int = 2,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        save_model(model, str(tmp / "model.safetensors"))  # stores tied weights once
        opt = optimizer.state_dict()
        tensors = {
            f"state.{index}.{name}": value.detach().contiguous()
            for index, entries in opt["state"].items()
            for name, value in entries.items()
        }
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {
            "train": state.to_json(),
            "param_groups": opt["param_groups"],
            "rng_torch": torch.get_rng_state().tolist(),
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        checksums = {name: sha256_file(tmp / name) for name in FILES}
        (tmp / "checksums.json").write_text(json.dumps(checksums, indent=1))
        fsync_tree(tmp)
        if final.exists():  # a redo of the same step after a resume: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> None:
    try:
        checksums = json.loads((path / "checksums.json").read_text())
    except (OSError, ValueError):
        raise IntegrityError(f"checkpoint {path}: checksums.json is missing or damaged") from None
    for name in FILES:
        if not (path / name).is_file():
            raise IntegrityError(f"checkpoint {path}: {name} is missing")
        if sha256_file(path / name) != checksums.get(name):
            raise IntegrityError(f"checkpoint {path}: {name} does not match its checksum (altered)")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore model, optimizer and RNG in place from a verified checkpoint; return the train state."""
    verify_checkpoint(path)
    load_model(model, str(path / "model.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(torch.tensor(meta["rng_torch"], dtype=torch.uint8))
    train = meta["train"]
    return TrainState(train["step"], train["sample"], train["tokens"], train.get("extra") or None)
