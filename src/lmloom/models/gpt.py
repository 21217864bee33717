"""A GPT-2-style decoder-only transformer composed from `blocks.py`.

Learned token + absolute position embeddings (and dropout), then N pre-norm blocks (LayerNorm with bias,
causal attention with biases, GELU-tanh MLP with biases), a final LayerNorm, and an LM head that is the
token embedding (tied) unless `tie_embeddings` is off. The same function as Hugging Face
`GPT2LMHeadModel`; `hf_gpt2.py` maps configs and weights.

Unlike the speed-tuned Llama `decoder.py`, this model takes an optional "may attend" mask that replaces
the causal one, so objectives such as prefix LM (`lmloom.objectives.prefix`) can run on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lmloom.models.blocks import (
    Activation,
    BlockConfig,
    LearnedPositions,
    TransformerBlock,
    check_attention_mask,
    init_normal_,
)
from lmloom.models.decoder import IGNORE_INDEX

# OpenAI's GPT-2 sizes (Radford et al. 2019, as published on the Hugging Face hub): (layers, d_model,
# heads). "tiny" is for tests and smoke runs.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 4),
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
# Names of the residual-branch output projections: GPT-2 scales their init by 1/sqrt(2 * n_layers).
_RESIDUAL_PROJECTIONS = ("attn.proj", "mlp.down")


class GPTConfig(BaseModel):
    """Shape and numerics of a `GPT`. Defaults are GPT-2 small (124M, the 50257-token BPE vocabulary)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(50257, ge=1)
    seq_len: int = Field(1024, ge=1, description="maximum number of positions (HF n_positions)")
    d_model: int = Field(768, ge=1)
    n_layers: int = Field(12, ge=1)
    n_heads: int = Field(12, ge=1)
    ffn_hidden: int | None = Field(None, ge=1, description="None = 4 * d_model")
    activation: Activation = "gelu_tanh"
    norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon (HF layer_norm_epsilon)")
    bias: bool = Field(True, description="biases in every Linear and LayerNorm (GPT-2 has them)")
    dropout: float = Field(0.0, ge=0, lt=1, description="embeddings and residual branches")
    attn_dropout: float = Field(0.0, ge=0, lt=1, description="attention probabilities")
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self) -> GPTConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self

    @property
    def hidden_dim(self) -> int:
        return 4 * self.d_model if self.ffn_hidden is None else self.ffn_hidden

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size ("tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"); `overrides` set any
        other field."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose from {sorted(PRESETS)}")
        n_layers, d_model, n_heads = PRESETS[name]
        return cls(**({"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads} | overrides))

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            ffn_hidden=self.hidden_dim,
            norm="layernorm",
            norm_eps=self.norm_eps,
            norm_bias=self.bias,
            activation=self.activation,
            bias=self.bias,
            norm_position="pre",
            dropout=self.dropout,
            attn_dropout=self.attn_dropout,
        )

    def num_params(self) -> int:
        """Parameter count from the shapes alone (no weights built); equals `GPT(self).num_params()`."""
        d, h, n_bias = self.d_model, self.hidden_dim, int(self.bias)
        attention = 4 * d * d + 4 * d * n_bias
        mlp = 2 * d * h + (h + d) * n_bias
        norms = 2 * (d + d * n_bias)
        per_layer = attention + mlp + norms
        embeddings = (self.vocab_size + self.seq_len) * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embeddings + self.n_layers * per_layer + (d + d * n_bias) + head


class GPT(nn.Module):
    """Token ids -> logits, or -> mean next-token loss when targets are given (see `forward`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = LearnedPositions(cfg.seq_len, cfg.d_model)
        block = cfg.block_config()
        self.layers = nn.ModuleList(TransformerBlock(block) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        # Tied: no separate parameter, so state_dict() has no alias of the embedding (safetensors refuses
        # shared tensors) and num_params() counts it once.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's init: N(0, init_std) weights, zero biases, LayerNorms 1 / 0; the projections that write
        into the residual stream get std / sqrt(2 * n_layers), so its variance does not grow with depth."""
        cfg = self.config
        init_normal_(self, cfg.init_std)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(_RESIDUAL_PROJECTIONS):
                nn.init.normal_(module.weight, std=residual_std)

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNormed hidden states [B, T, d_model] for idx [B, T]."""
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"{T} positions exceed seq_len {self.config.seq_len}")
        x = self.tok_emb(idx) + self.pos_emb(T)
        x = F.dropout(x, self.config.dropout, training=self.training)
        if attention_mask is None:
            for layer in self.layers:
                x = layer(x, is_causal=True)
        else:
            # The given mask replaces causality: prefix LM makes the prefix bidirectional.
            mask = check_attention_mask(attention_mask, B, T)
            for layer in self.layers:
                x = layer(x, mask=mask)
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for idx [B, T]; with targets [B, T] (the next token of each position, already
        shifted; IGNORE_INDEX = skip) the mean cross-entropy over the targets kept instead (0 when none is).

        attention_mask: boolean [B, T, T] or [B, 1, T, T], True where query i may attend to key j; it
        replaces the causal mask (None = plain causal attention).
        """
        logits = F.linear(self.hidden_states(idx, attention_mask), self.head_weight)
        if targets is None:
            return logits
        targets = targets.reshape(-1)
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        # Sum / count rather than "mean": a batch with every target ignored gives 0, not NaN.
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters, the tied LM head counted once; `exclude_embedding` leaves out the token and
        position tables (the tied head, being the token table, goes with them)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n


__all__ = ["GPT", "GPTConfig", "IGNORE_INDEX", "PRESETS"]
