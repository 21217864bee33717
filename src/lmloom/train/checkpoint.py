"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, all verified.

A checkpoint is a directory `step-00000123/` holding

    model.safetensors      model weights
    optimizer.safetensors  optimizer state tensors, keyed `state.<param index>.<name>`
    state.json             step, data position, optimizer param groups, RNG states, counters, and
                           the model's depth when progressive depth growth changes it
    checksums.json         sha256 of the three files above

written to a temp directory and renamed into place, so a crash (even `kill -9`) leaves either the
whole checkpoint or none of it. Loading refuses a checkpoint whose files do not match checksums.json.

When the run encrypts at rest (`CheckpointCodecs`), the three files are stored through an encrypting
codec (`lmloom.security.encryption`, a fresh binding per checkpoint) and `encryption.json` holds the
codec's header (no key material); checksums.json then covers the ciphertext and that header, so no
plaintext weights of an encrypted run ever lie on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, load_model, save_file, save_model
from safetensors.torch import save as save_safetensors

from lmloom.artifacts.atomic import fsync_dir, fsync_tree
from lmloom.artifacts.files import Codec, read_all
from lmloom.artifacts.hashing import sha256_file
from lmloom.artifacts.manifest import Manifest
from lmloom.errors import IntegrityError, SecurityError

PREFIX = "step-"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
ENCRYPTION_FILE = "encryption.json"


@dataclass(frozen=True)
class CheckpointCodecs:
    """How a run that encrypts at rest stores its scratch checkpoints."""

    new: Callable[[], Codec]  # a fresh encrypting codec (its own binding) for each checkpoint
    reader: Callable[[dict[str, Any], str], Codec]  # (encryption.json header, where) -> its reader

    @classmethod
    def from_store_security(cls, security: Any) -> CheckpointCodecs:
        """Codecs from the store's security hooks: the same keys and scheme as the run's artifacts."""

        def reader(header: dict[str, Any], where: str) -> Codec:
            scratch = Manifest(
                kind="scratch", stage="", files={}, tool={}, principal="", created="", encryption=header
            )
            return security.read_codec(scratch, where)

        return cls(new=lambda: security.write_codec(True), reader=reader)


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps completed
    sample: int = 0  # next training sample index of the window loader
    tokens: int = 0  # training tokens consumed
    extra: dict[str, Any] | None = None
    depth: int | None = None  # layers of the model, when progressive depth growth changes them

    def to_json(self) -> dict[str, Any]:
        out = {"step": self.step, "sample": self.sample, "tokens": self.tokens, "extra": self.extra or {}}
        if self.depth is not None:
            out["depth"] = self.depth
        return out

    @classmethod
    def from_json(cls, train: dict[str, Any]) -> TrainState:
        return cls(
            train["step"], train["sample"], train["tokens"], train.get("extra") or None, train.get("depth")
        )


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    keep: int = 2,
    codecs: CheckpointCodecs | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        opt = optimizer.state_dict()
        tensors = {
            f"state.{index}.{name}": value.detach().contiguous()
            for index, entries in opt["state"].items()
            for name, value in entries.items()
        }
        meta = {
            "train": state.to_json(),
            "param_groups": opt["param_groups"],
            "rng_torch": torch.get_rng_state().tolist(),
        }
        names = FILES
        if codecs is None:
            save_model(model, str(tmp / "model.safetensors"))  # stores tied weights once
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta))
        else:
            _write_encrypted(tmp, codecs.new(), model, tensors, meta)
            names = (*FILES, ENCRYPTION_FILE)
        checksums = {name: sha256_file(tmp / name) for name in names}
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
    encrypted = (path / ENCRYPTION_FILE).exists() or ENCRYPTION_FILE in checksums
    for name in (*FILES, ENCRYPTION_FILE) if encrypted else FILES:
        if not (path / name).is_file():
            raise IntegrityError(f"checkpoint {path}: {name} is missing")
        if sha256_file(path / name) != checksums.get(name):
            raise IntegrityError(f"checkpoint {path}: {name} does not match its checksum (altered)")


def read_train_state(path: Path, codecs: CheckpointCodecs | None = None) -> TrainState:
    """The train state of a verified checkpoint, without loading tensors (e.g. its depth, to build the
    model it fits before `load_checkpoint`)."""
    verify_checkpoint(path)
    encrypted = _check_encryption(path, codecs)
    if not encrypted:
        meta = json.loads((path / "state.json").read_text())
    else:
        assert codecs is not None
        codec = codecs.reader(json.loads((path / ENCRYPTION_FILE).read_text()), f"checkpoint {path}")
        meta = json.loads(read_all(codec.open_read(path / "state.json", "state.json")))
    return TrainState.from_json(meta["train"])


def _check_encryption(path: Path, codecs: CheckpointCodecs | None) -> bool:
    encrypted = (path / ENCRYPTION_FILE).is_file()
    if encrypted and codecs is None:
        raise SecurityError(f"checkpoint {path} is encrypted; this run has no key to read it")
    if codecs is not None and not encrypted:
        raise IntegrityError(f"checkpoint {path} is not encrypted, but this run encrypts at rest")
    return encrypted


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    codecs: CheckpointCodecs | None = None,
) -> TrainState:
    """Restore model, optimizer and RNG in place from a verified checkpoint; return the train state."""
    verify_checkpoint(path)
    _check_encryption(path, codecs)
    if codecs is None:
        load_model(model, str(path / "model.safetensors"))
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
    else:
        codec = codecs.reader(json.loads((path / ENCRYPTION_FILE).read_text()), f"checkpoint {path}")

        def read(name: str) -> bytes:
            return read_all(codec.open_read(path / name, name))

        _load_model_bytes(model, read("model.safetensors"), path)
        meta = json.loads(read("state.json"))
        tensors = load_safetensors(read("optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(torch.tensor(meta["rng_torch"], dtype=torch.uint8))
    return TrainState.from_json(meta["train"])


# -- encrypted checkpoints: the same safetensors/JSON payloads, written and read as bytes ----------


def _write_encrypted(
    tmp: Path, codec: Codec, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    payloads = {
        "model.safetensors": save_safetensors(_unaliased_state(model)),
        "optimizer.safetensors": save_safetensors(tensors),
        "state.json": json.dumps(meta).encode("utf-8"),
    }
    for name, data in payloads.items():
        with codec.open_write(tmp / name, name) as handle:
            handle.write(data)
    (tmp / ENCRYPTION_FILE).write_text(json.dumps(codec.header()))


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> first name sharing the same storage view (tied weights), as `save_model` drops them."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _unaliased_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    dropped = _aliases(state)
    return {k: v.detach().contiguous() for k, v in state.items() if k not in dropped}


def _load_model_bytes(model: torch.nn.Module, data: bytes, path: Path) -> None:
    missing, unexpected = model.load_state_dict(load_safetensors(data), strict=False)
    if unexpected or set(missing) - _aliases(model.state_dict()).keys():
        raise IntegrityError(
            f"checkpoint {path}: model.safetensors does not fit the model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
