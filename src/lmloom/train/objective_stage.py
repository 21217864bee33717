"""`train.objective`: pre-train a GPT-2, BERT or T5 model (built from the shared blocks) with its
objective — causal LM, prefix LM, masked LM or span corruption — and save it in Hugging Face format.

The training loop is the same one `train.pretrain` uses: it sees (inputs, targets) pairs and a model
called as `model(inputs, targets) -> loss`. Here the pairs come from the objective (a seeded transform
of the loader's windows, the generator drawn from (seed, first sample), so resume stays exact) and
the model is a thin wrapper that turns them into the architecture's own call:

    gpt  + clm        GPT(inputs, targets)
    gpt  + prefix_lm  GPT(inputs, targets, attention_mask): the prefix is read off the targets (they
                      are IGNORE_INDEX up to the last prefix position)
    bert + mlm        cross-entropy of Encoder.mlm_logits(inputs) against targets
    t5   + span       T5(inputs, shift_right(targets), padding mask, targets)

Tokens the objective needs beyond the tokenizer's vocabulary get ids after it: BERT's mask token is
id V, T5's 100 sentinels are V .. V + 99 (<extra_id_0> = V + 99, as T5 counts down). The artifact
holds config.json + model.safetensors that `transformers` loads (GPT2LMHeadModel, BertForMaskedLM,
T5ForConditionalGeneration), the tokenizer files and the metrics.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from lmloom.artifacts.manifest import Manifest
from lmloom.errors import ConfigError
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.objectives import (
    IGNORE_INDEX,
    MaskedLMConfig,
    SpanCorruptionConfig,
    causal_lm,
    masked_lm,
    prefix_lm,
    span_corruption,
)
from lmloom.objectives.prefix import prefix_lm_attention_mask
from lmloom.stages import Stage
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES, BOS_ID, EOS_ID, PAD_ID
from lmloom.tokenizers.loader import WindowLoader, _check_windows, _gather
from lmloom.tokenizers.loading import load_tokenizer
from lmloom.tokenizers.shards import TokenShards
from lmloom.train.checkpoint import CheckpointCodecs
from lmloom.train.curriculum import _mix
from lmloom.train.optim import build_optimizer
from lmloom.train.trainer import LoopConfig, train_loop

PAIRS = {"gpt": ("clm", "prefix_lm"), "bert": ("mlm",), "t5": ("span",)}
N_SENTINELS = 100


class ObjectiveTrainConfig(LoopConfig):
    architecture: Literal["gpt", "bert", "t5"] = "gpt"
    objective: Literal["clm", "prefix_lm", "mlm", "span"] = "clm"
    preset: str = Field("tiny", description="the architecture's named preset (see its config class)")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the preset's fields")
    seq_len: int = Field(128, ge=8, description="tokens per training window")
    seed: int = Field(1337, description="seeds initialisation, the data order and the objective's draws")
    compile: bool = Field(False, description="torch.compile the model for training")

    @model_validator(mode="after")
    def _pair(self) -> ObjectiveTrainConfig:
        if self.objective not in PAIRS[self.architecture]:
            raise ValueError(
                f"objective {self.objective!r} does not fit architecture {self.architecture!r}; it takes "
                f"{', '.join(PAIRS[self.architecture])}"
            )
        return self


# -- the models, wrapped to the loop's model(inputs, targets) -> loss -----------------------------------


class CausalLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, targets)


class PrefixLoss(CausalLoss):
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ignored = (targets == IGNORE_INDEX).int()
        leading = ignored.cumprod(dim=1).sum(dim=1)  # IGNORE targets before the first scored one
        mask = prefix_lm_attention_mask(leading + 1, inputs.shape[1])
        return self.model(inputs, targets, attention_mask=mask)


class MaskedLoss(CausalLoss):
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model.mlm_logits(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


class SpanLoss(CausalLoss):
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        decoder_inputs = self.model.shift_right(targets)
        padding = (inputs != self.model.config.pad_id).long()
        return self.model(inputs, decoder_inputs, attention_mask=padding, targets=targets)


def build_model(config: ObjectiveTrainConfig, vocab: int) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(the model, its loss wrapper, the model's vocabulary size)."""
    overrides = dict(config.model)
    if config.architecture == "gpt":
        from lmloom.models.gpt import GPT, GPTConfig

        cfg = GPTConfig.preset(config.preset, **{"vocab_size": vocab, "seq_len": config.seq_len, **overrides})
        model = GPT(cfg)
        return model, (PrefixLoss if config.objective == "prefix_lm" else CausalLoss)(model), vocab
    if config.architecture == "bert":
        from lmloom.models.encoder import Encoder, EncoderConfig

        # masked LM corrupts whole windows (seq_len + 1 tokens): no shift, so one more position
        cfg = EncoderConfig.preset(
            config.preset,
            **{
                "vocab_size": vocab + 1,
                "max_positions": config.seq_len + 1,
                "pad_token_id": PAD_ID,
                **overrides,
            },
        )
        model = Encoder(cfg)
        return model, MaskedLoss(model), vocab + 1
    from lmloom.models.encoder_decoder import T5, T5Config

    cfg = T5Config.preset(
        config.preset,
        **{
            "vocab_size": vocab + N_SENTINELS,
            "pad_id": PAD_ID,
            "decoder_start_token_id": PAD_ID,
            **overrides,
        },
    )
    model = T5(cfg)
    return model, SpanLoss(model), vocab + N_SENTINELS


def objective_transform(config: ObjectiveTrainConfig, vocab: int):
    """windows [B, T + 1], generator -> (inputs, targets) of the configured objective."""
    if config.objective == "clm":
        return lambda windows, gen: _pair(causal_lm(windows, gen))
    if config.objective == "prefix_lm":
        return lambda windows, gen: _pair(prefix_lm(windows, gen))
    if config.objective == "mlm":
        mlm = MaskedLMConfig(
            mask_token_id=vocab,
            vocab_size=vocab + 1,
            special_ids=frozenset({BOS_ID, EOS_ID, PAD_ID}),
            pad_id=PAD_ID,
        )
        return lambda windows, gen: _pair(masked_lm(windows, mlm, gen))
    span = SpanCorruptionConfig(
        first_sentinel_id=vocab + N_SENTINELS - 1,
        n_sentinels=N_SENTINELS,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        decoder_start_id=PAD_ID,
    )
    return lambda windows, gen: _pair(span_corruption(windows, span, gen))


def _pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.input_ids, batch.targets


def _generator(seed: int, index: int) -> torch.Generator:
    with np.errstate(over="ignore"):
        value = int(_mix(np.array([seed * 1_000_003 + index], dtype=np.uint64))[0]) & (2**63 - 1)
    return torch.Generator().manual_seed(value)


class ObjectiveLoader:
    """The window loader's samples, transformed by the objective with a per-batch seeded generator."""

    def __init__(self, base: WindowLoader, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.batch(start_sample, batch_size)
        windows = torch.cat([x, y[:, -1:]], dim=1)
        return self.transform(windows, _generator(self.seed, start_sample))


def objective_val_batches(
    shards: TokenShards, seq_len: int, batch_size: int, limit: int, transform, seed: int
):
    n_windows = min(_check_windows(shards, seq_len), limit)
    for first in range(0, n_windows, batch_size):
        x, y = _gather(shards, np.arange(first, min(first + batch_size, n_windows)), seq_len)
        yield transform(torch.cat([x, y[:, -1:]], dim=1), _generator(seed + 1, first))


def run(config: ObjectiveTrainConfig, inputs, ctx, out) -> None:
    shards_art, tok_art = inputs["shards"], inputs["tokenizer"]
    if shards_art.manifest.inputs.get("tokenizer") != tok_art.id:
        raise ConfigError(
            f"stages.{ctx.step}.inputs: shards {shards_art.short_id} were not encoded with tokenizer {tok_art.short_id}"
        )
    vocab = load_tokenizer(tok_art).vocab_size
    torch.manual_seed(config.seed)
    try:
        model, loss_model, model_vocab = build_model(config, vocab)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"stages.{ctx.step}.config: {exc}") from None
    transform = objective_transform(config, vocab)
    train = TokenShards(shards_art, "train")
    val = TokenShards(shards_art, "val")
    data = ObjectiveLoader(WindowLoader(train, config.seq_len, seed=config.seed), transform, config.seed)
    optimizer = build_optimizer(model, config.optim)
    n_params = sum(p.numel() for p in model.parameters())
    ctx.log(
        f"{config.architecture} ({config.preset}, {n_params:,} parameters, vocabulary {model_vocab:,}) with "
        f"{config.objective}; {config.max_steps} steps of {config.batch_size} x {config.grad_accum} windows of "
        f"{config.seq_len} tokens"
    )
    metrics = JsonlMetrics(ctx.work_dir / "metrics.jsonl")
    scratch_codecs = CheckpointCodecs.from_store_security(ctx.store.security) if ctx.encrypt else None
    quiet = ctx.console.is_terminal
    with ctx.progress(config.max_steps, f"pre-training ({config.objective})") as bar:
        result = train_loop(
            loss_model,
            optimizer,
            data,
            lambda limit: objective_val_batches(
                val, config.seq_len, config.batch_size, limit, transform, config.seed
            ),
            config,
            config.seq_len,
            ctx.work_dir / "checkpoints",
            metrics,
            progress=bar,
            log=(lambda _msg: None) if quiet else ctx.log,
            checkpoint_codecs=scratch_codecs,
        )
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as tmp:
        _export(config.architecture, model, Path(tmp))
        for path in sorted(Path(tmp).iterdir()):
            out.write_bytes(path.name, path.read_bytes())
    for name in ALL_TOKENIZER_FILES:  # none of them is called config.json or model.safetensors
        if tok_art.has(name):
            out.copy_from(tok_art, name)
    out.write_bytes("metrics.jsonl", metrics.path.read_bytes())
    out.metadata.update(
        architecture=config.architecture,
        objective=config.objective,
        parameters=n_params,
        vocabulary=model_vocab,
        steps=result.state.step,
        tokens=result.state.tokens,
        train_loss=result.train_loss,
        val_loss=result.val_loss,
        tokens_per_s=round(result.tokens_per_s, 1),
        seconds=round(result.seconds, 1),
        tokenizer=tok_art.id,
        hf_class={"gpt": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "t5": "T5ForConditionalGeneration"}[
            config.architecture
        ],
    )
    ctx.log(f"done: train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}")


def _export(architecture: str, model: torch.nn.Module, path: Path) -> None:
    if architecture == "gpt":
        from lmloom.models.hf_gpt2 import export_hf_dir
    elif architecture == "bert":
        from lmloom.models.hf_bert import export_hf_dir
    else:
        from lmloom.models.hf_t5 import export_hf_dir
    export_hf_dir(model, path)


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    return [
        ("model", f"{m['architecture']} with {m['objective']}, {m['parameters']:,} parameters"),
        ("training steps", f"{m['steps']:,} ({m['tokens']:,} tokens)"),
        (
            "train / validation loss",
            f"{m['train_loss']:.4f} / {m['val_loss']:.4f} (ppl {math.exp(min(m['val_loss'], 50)):.1f})",
        ),
        ("format", f"Hugging Face {m['hf_class']} (config.json + model.safetensors)"),
    ]


OBJECTIVE = Stage(
    name="train.objective",
    kind="hf-model",
    config=ObjectiveTrainConfig,
    run=run,
    inputs={"shards": "shards", "tokenizer": "tokenizer"},
    permissions=("train",),
    summary=summary,
    description="pre-train GPT-2 (causal or prefix LM), BERT (masked LM) or T5 (span corruption); Hugging Face output",
)
