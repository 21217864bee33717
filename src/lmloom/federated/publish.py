"""The federated run's data and result in the artifact store.

Inputs: a `shards` artifact (clients train on contiguous slices of its `train` split, the server evaluates
on its `val` split) or plain `.npy` files (recorded by sha256). Result: a `checkpoint` artifact with the
same files as `train.pretrain`'s (model.safetensors, model.json, the tokenizer's files when one is known),
written through the store's writer, so it is verified on every read, signed when the store has a key and
audited (`stage.start` / `stage.end`, as a recipe step is).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from lmloom.artifacts.hashing import sha256_file, sha256_json
from lmloom.artifacts.store import Artifact, ArtifactStore, default_store_root
from lmloom.errors import ConfigError
from lmloom.federated.local import FederatedConfig

STAGE = "federated.fedavg"
STEP = "federated"


def open_store(root: Path | None) -> ArtifactStore:
    """The store with the same security hooks the CLI uses (verification, signature policy, decryption)."""
    from lmloom.security.context import store_security

    root = Path(root) if root else default_store_root()
    return ArtifactStore(root, security=store_security(root))


def open_shards(store: ArtifactStore, ref: str, cfg: FederatedConfig | None = None) -> Artifact:
    """The verified shards artifact; with `cfg`, checked to fit the model's vocabulary."""
    from lmloom.tokenizers.shards import read_header

    artifact = store.open(ref)  # verified (and signature-checked) before anything reads it
    if artifact.kind != "shards":
        raise ConfigError(f"--shards {ref}: artifact {artifact.short_id} is a {artifact.kind}, not shards")
    vocab = int(read_header(artifact)["vocab_size"])
    if cfg is not None and vocab > cfg.decoder().vocab_size:
        raise ConfigError(
            f"shards {artifact.short_id} have a vocabulary of {vocab}, the model only "
            f"{cfg.decoder().vocab_size}: set model.vocab_size = {vocab}"
        )
    return artifact


def split_bounds(n_tokens: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `n_tokens` are cut like `np.array_split` into `parts`."""
    size, extra = divmod(n_tokens, parts)
    start = index * size + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def client_slice(shards: Artifact, clients: int, index: int) -> np.ndarray:
    """Client `index`'s contiguous slice of the verified shards' train split."""
    from lmloom.tokenizers.shards import TokenShards

    train = TokenShards(shards, "train")
    start, stop = split_bounds(len(train), clients, index)
    return np.asarray(train.tokens(start, stop)).astype(np.int64)


def shards_val(shards: Artifact, cfg: FederatedConfig) -> np.ndarray:
    """The start of the shards' val split: as many tokens as the server's evaluation reads."""
    from lmloom.tokenizers.shards import TokenShards

    val = TokenShards(shards, "val")
    need = cfg.eval_windows * cfg.decoder().seq_len + 1
    return np.asarray(val.tokens(0, min(len(val), need))).astype(np.int64)


class Publisher:
    """Checks the principal may train, audits the start, and publishes the final model as a checkpoint."""

    def __init__(
        self,
        store: ArtifactStore,
        cfg: FederatedConfig,
        *,
        shards: Artifact | None = None,
        tokenizer: str | None = None,
        data: dict | None = None,
    ):
        from lmloom.security.context import store_audit_log
        from lmloom.security.policy import resolve_access

        self.store, self.cfg = store, cfg
        self.access = resolve_access(store.root)
        self.audit = store_audit_log(store.root)  # signs its head when the store has a signing key
        self.access.require("train", action="federated training", stage=STAGE)
        self.config = cfg.model_dump(mode="json")
        self.inputs: dict[str, str] = {}
        if shards is not None:
            self.inputs["shards"] = shards.id
            tokenizer = tokenizer or shards.manifest.inputs.get("tokenizer")
        self.tokenizer = store.open(tokenizer) if tokenizer else None
        if self.tokenizer is not None:
            if self.tokenizer.kind != "tokenizer":
                raise ConfigError(
                    f"artifact {self.tokenizer.short_id} is a {self.tokenizer.kind}, not a tokenizer"
                )
            self.inputs["tokenizer"] = self.tokenizer.id
        self.data = data or {}
        # Not a cache key (a federated run is never reused): it ties the audit entries of this run together.
        self.key = sha256_json(
            {"stage": STAGE, "config": self.config, "inputs": self.inputs, "t": time.time()}
        )
        self.started = time.perf_counter()
        self._audit("stage.start", inputs=sorted(self.inputs.values()), config_hash=sha256_json(self.config))

    def _audit(self, event: str, **fields) -> None:
        self.audit.append(event, self.access.principal, step=STEP, stage=STAGE, stage_key=self.key, **fields)

    def failed(self, exc: BaseException) -> None:
        seconds = round(time.perf_counter() - self.started, 3)
        self._audit("stage.end", outcome="error", error=f"{type(exc).__name__}: {exc}"[:500], seconds=seconds)

    def publish(self, model, result: dict) -> Artifact:
        from lmloom.models.io import model_files
        from lmloom.tokenizers.base import ALL_TOKENIZER_FILES

        cfg = self.cfg
        out = self.store.create(
            kind="checkpoint",
            stage=STAGE,
            config=self.config,
            inputs=self.inputs,
            principal=self.access.principal,
        )
        try:
            for name, data in model_files(model).items():
                out.write_bytes(name, data)
            if self.tokenizer is not None:
                for name in ALL_TOKENIZER_FILES:  # whichever the tokenizer's format has
                    if self.tokenizer.has(name):
                        out.copy_from(self.tokenizer, name)
            out.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in result["rounds"]))
            out.metadata.update(
                parameters=model.num_params(),
                model=cfg.decoder().model_dump(mode="json"),
                federated=True,
                run_id=result["run_id"],
                rounds=cfg.rounds,
                clients=cfg.clients,
                local_steps=cfg.local_steps,
                secure=cfg.secure,
                dp={"clip": cfg.dp_clip, "noise": cfg.dp_noise},
                tokens=result["tokens"],
                initial_val_loss=result["initial_val_loss"],
                val_loss=result["val_loss"],
                val_ppl=math.exp(result["val_loss"]),
                val_losses=[r["val_loss"] for r in result["rounds"]],
                train_loss=result["rounds"][-1]["train_loss"],
                tokenizer=self.tokenizer.id if self.tokenizer is not None else None,
                data=self.data,
            )
            artifact = out.commit()
        except BaseException as exc:
            out.abort()
            self.failed(exc)
            raise
        seconds = round(time.perf_counter() - self.started, 3)
        self._audit("stage.end", outcome="ok", outputs=[artifact.id], seconds=seconds)
        return artifact


def file_record(path: Path) -> dict:
    return {"file": Path(path).name, "sha256": sha256_file(path)}
