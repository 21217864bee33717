"""`train.continue`: continual pre-training of a checkpoint on new token shards, with replay.

A model trained on old data and then on new data alone forgets the old (its loss there rises). The
classic remedy is a replay buffer: a share of every batch comes from the old data. Here the old data
is the token shards the checkpoint was trained on (found through its lineage, so nothing else needs
naming), and `replay` is the expected share of old windows per batch. Which samples are replayed is a
hash of (seed, sample number), so the data position is still one integer and resume stays exact.

The stage measures what it set out to control and records it in the checkpoint's metadata:
validation loss on the old data before and after (their difference is the forgetting) and on the new
data after.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field

from lmloom.artifacts.manifest import Manifest
from lmloom.errors import ConfigError
from lmloom.models.io import model_files, model_from_files, refuse_adapter_only
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.stages import Stage
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES
from lmloom.tokenizers.loader import WindowLoader, _gather, check_windows, validation_batches
from lmloom.tokenizers.shards import TokenShards
from lmloom.train.checkpoint import CheckpointCodecs
from lmloom.train.curriculum import _mix
from lmloom.train.optim import build_optimizer
from lmloom.train.trainer import LoopConfig, evaluate, train_loop


class ContinueConfig(LoopConfig):
    seed: int = Field(1337, ge=0, description="seeds the data order and the replay draws")
    replay: float = Field(0.25, ge=0, lt=1, description="expected share of old-data windows per batch")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: torch's choice)")


class ReplayLoader:
    """New windows, with each sample replaced by an old window with probability `replay`."""

    def __init__(self, new: WindowLoader, old: WindowLoader, replay: float, seed: int):
        self.new, self.old, self.replay = new, old, replay
        self.seq_len = new.seq_len
        with np.errstate(over="ignore"):
            self._salt = _mix(np.array([seed ^ 0x5EED], dtype=np.uint64))[0]

    def is_replay(self, samples: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            draws = _mix(samples.astype(np.uint64) ^ self._salt)
        return (draws >> np.uint64(11)).astype(np.float64) / 2.0**53 < self.replay

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        samples = np.arange(start_sample, start_sample + batch_size, dtype=np.int64)
        replay = self.is_replay(samples)
        xs, ys = [], []
        for sample, from_old in zip(samples.tolist(), replay.tolist(), strict=True):
            loader = self.old if from_old else self.new
            x, y = _gather(loader.shards, loader.windows(sample, 1), self.seq_len)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)


def run(config: ContinueConfig, inputs, ctx, out) -> None:
    checkpoint, shards_art = inputs["checkpoint"], inputs["shards"]
    tokenizer_id = checkpoint.manifest.metadata.get("tokenizer")
    if shards_art.manifest.inputs.get("tokenizer") != tokenizer_id:
        raise ConfigError(
            f"stages.{ctx.step}.inputs: shards {shards_art.short_id} were not encoded with the tokenizer "
            f"of checkpoint {checkpoint.short_id} ({str(tokenizer_id)[:12]})"
        )
    old_shards_id = _trained_on(ctx.store, checkpoint)
    old_art = ctx.store.open(old_shards_id)  # verified like any input
    if config.threads:
        torch.set_num_threads(config.threads)

    torch.manual_seed(config.seed)
    refuse_adapter_only(checkpoint)
    model = model_from_files(checkpoint.read_bytes).train()
    seq_len = model.config.seq_len
    optimizer = build_optimizer(model, config.optim)
    new_train, new_val = TokenShards(shards_art, "train"), TokenShards(shards_art, "val")
    old_train, old_val = TokenShards(old_art, "train"), TokenShards(old_art, "val")
    check_windows(new_val, seq_len)  # too short for one window: fail now, not after training
    new_loader = WindowLoader(new_train, seq_len, seed=config.seed)
    data = new_loader
    if config.replay > 0:
        data = ReplayLoader(
            new_loader, WindowLoader(old_train, seq_len, seed=config.seed + 1), config.replay, config.seed
        )

    def old_val_loss(limit: int) -> float:
        return evaluate(
            model,
            validation_batches(old_val, seq_len, config.batch_size, max_windows=limit),
            config.precision,
        )

    old_before = old_val_loss(config.final_eval_windows)
    ctx.log(
        f"continuing checkpoint {checkpoint.short_id} ({model.num_params():,} parameters) on shards "
        f"{shards_art.short_id}, replaying {config.replay:.0%} from {old_art.short_id}; old-data val loss "
        f"before: {old_before:.4f}"
    )
    metrics = JsonlMetrics(ctx.work_dir / "metrics.jsonl")
    scratch_codecs = CheckpointCodecs.from_store_security(ctx.store.security) if ctx.encrypt else None
    quiet = ctx.console.is_terminal
    with ctx.progress(config.max_steps, "continual pre-training") as bar:
        result = train_loop(
            model,
            optimizer,
            data,
            lambda limit: validation_batches(new_val, seq_len, config.batch_size, max_windows=limit),
            config,
            seq_len,
            ctx.work_dir / "checkpoints",
            metrics,
            progress=bar,
            log=(lambda _msg: None) if quiet else ctx.log,
            checkpoint_codecs=scratch_codecs,
        )
    old_after = old_val_loss(config.final_eval_windows)
    for name, payload in model_files(model).items():
        out.write_bytes(name, payload)
    for name in ALL_TOKENIZER_FILES:
        if checkpoint.has(name):
            out.copy_from(checkpoint, name)
    out.write_bytes("metrics.jsonl", metrics.path.read_bytes())
    out.metadata.update(
        parameters=model.num_params(),
        model=model.config.model_dump(mode="json"),
        steps=result.state.step,
        tokens=result.state.tokens,
        train_loss=result.train_loss,
        val_loss=result.val_loss,
        val_ppl=math.exp(result.val_loss),
        old_val_loss_before=old_before,
        old_val_loss_after=old_after,
        forgetting=old_after - old_before,
        replay=config.replay,
        replay_shards=old_art.id,
        continued_from=checkpoint.id,
        tokens_per_s=round(result.tokens_per_s, 1),
        seconds=round(result.seconds, 1),
        precision=config.precision,
        compiled=config.compile,
        tokenizer=tokenizer_id,
    )
    ctx.log(
        f"done: new-data val loss {result.val_loss:.4f}; old-data val loss {old_before:.4f} -> "
        f"{old_after:.4f} (forgetting {old_after - old_before:+.4f})"
    )


def _trained_on(store, checkpoint) -> str:
    """The token shards a checkpoint learned from: its own input, or (continued) its source's."""
    meta = checkpoint.manifest
    if "shards" in meta.inputs and meta.stage == "train.pretrain":
        return meta.inputs["shards"]
    replayed = meta.metadata.get("replay_shards")
    if replayed:
        return replayed
    raise ConfigError(f"checkpoint {checkpoint.short_id} does not say which shards it was trained on")


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    return [
        ("continued from", m["continued_from"][:12]),
        ("training steps", f"{m['steps']:,} ({m['tokens']:,} tokens), replay {m['replay']:.0%}"),
        ("new-data validation loss", f"{m['val_loss']:.4f}"),
        (
            "old-data validation loss",
            f"{m['old_val_loss_before']:.4f} -> {m['old_val_loss_after']:.4f} (forgetting {m['forgetting']:+.4f})",
        ),
    ]


CONTINUE = Stage(
    name="train.continue",
    kind="checkpoint",
    config=ContinueConfig,
    run=run,
    inputs={"checkpoint": "checkpoint", "shards": "shards"},
    permissions=("train",),
    summary=summary,
    description="continue pre-training a checkpoint on new shards, replaying its old data; reports forgetting",
)
