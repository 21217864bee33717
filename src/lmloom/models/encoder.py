"""An encoder-only transformer (BERT) composed from `blocks.py`.

Embeddings: word + learned absolute position + (optional) token type, then LayerNorm and dropout. Then N
post-norm blocks (attention and a GELU MLP, all with biases). On top: an optional pooler (dense + tanh on
the first, [CLS], token) and an optional masked-LM head (dense + GELU + LayerNorm, then a decoder whose
weight is the word embedding, plus a bias). The same function as Hugging Face `BertForMaskedLM` /
`BertModel`; `hf_bert.py` maps configs and weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lmloom.models.blocks import (
    GATED_ACTIVATIONS,
    Activation,
    BlockConfig,
    LearnedPositions,
    TransformerBlock,
    activate,
    init_normal_,
)

# Sizes of Google's BERT miniatures (Turc et al. 2019) and BERT-base: (layers, d_model, heads).
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
}


class EncoderConfig(BaseModel):
    """Shape and numerics of an `Encoder`. Defaults are BERT-base (uncased vocabulary)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(30522, ge=1)
    max_positions: int = Field(512, ge=1)
    type_vocab_size: int = Field(2, ge=0, description="0 = no token-type (segment) embeddings")
    d_model: int = Field(768, ge=1)
    n_layers: int = Field(12, ge=1)
    n_heads: int = Field(12, ge=1)
    ffn_hidden: int | None = Field(None, ge=1, description="None = 4 * d_model")
    activation: Activation = "gelu"
    norm_eps: float = Field(1e-12, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1, description="embeddings and residual branches")
    attn_dropout: float = Field(0.1, ge=0, lt=1, description="attention probabilities")
    pooler: bool = True
    mlm_head: bool = True
    pad_token_id: int | None = Field(0, ge=0)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.activation in GATED_ACTIVATIONS:
            raise ValueError(
                f"the encoder's MLP and MLM head take a pointwise activation, not {self.activation}"
            )
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"pad_token_id {self.pad_token_id} is outside the vocabulary ({self.vocab_size})"
            )
        return self

    @property
    def hidden_dim(self) -> int:
        return 4 * self.d_model if self.ffn_hidden is None else self.ffn_hidden

    @classmethod
    def preset(cls, name: str, **overrides) -> EncoderConfig:
        """A named size ("tiny", "mini", "small", "medium", "base"); `overrides` set any other field."""
        if name not in PRESETS:
            raise ValueError(f"unknown encoder preset {name!r}; choose from {sorted(PRESETS)}")
        n_layers, d_model, n_heads = PRESETS[name]
        return cls(**({"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads} | overrides))

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            ffn_hidden=self.hidden_dim,
            norm="layernorm",
            norm_eps=self.norm_eps,
            activation=self.activation,
            bias=True,
            norm_position="post",
            dropout=self.dropout,
            attn_dropout=self.attn_dropout,
        )


class MLMHead(nn.Module):
    """Hidden states -> vocabulary logits; the decoder weight is passed in (the tied word embedding)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.activation = cfg.activation
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        h = self.norm(activate(self.dense(hidden), self.activation))
        return F.linear(h, decoder_weight, self.bias)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of hidden [B, T, D] over the real tokens (attention_mask 1) -> [B, D]: the sentence embedding
    of sentence-transformers' mean pooling."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class Encoder(nn.Module):
    """Token ids -> contextual hidden states [B, T, d_model]; `mlm_logits` and `pooled` on top."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = cfg = config
        # padding_idx: the pad row gets no gradient, as in HF BERT.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.pos_emb = LearnedPositions(cfg.max_positions, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.emb_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        block = cfg.block_config()
        self.layers = nn.ModuleList(TransformerBlock(block) for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.pooler else None
        self.mlm_head = MLMHead(cfg) if cfg.mlm_head else None
        self.init_weights()

    def init_weights(self) -> None:
        """BERT's init: N(0, init_std) weights, zero biases (MLM bias too), LayerNorms 1 / 0."""
        init_normal_(self, self.config.init_std)
        if self.mlm_head is not None:
            nn.init.zeros_(self.mlm_head.bias)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb(T)
        if self.type_emb is not None:
            # No token types given = every token in segment 0, as HF does.
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.type_emb(types)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given but the encoder has no token-type embeddings")
        x = self.emb_norm(x)
        return F.dropout(x, self.config.dropout, training=self.training)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states [B, T, d_model] for input_ids [B, T]; attention_mask [B, T] is 1 for tokens and
        0 for padding (no query attends to padding; padded positions still get an output)."""
        x = self.embed(input_ids, token_type_ids)
        # [B, 1, 1, T]: the same key mask for every head and query.
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask=mask)
        return x

    def mlm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked-LM logits [B, T, vocab_size]."""
        if self.mlm_head is None:
            raise ValueError("this encoder was built without an MLM head (mlm_head=False)")
        hidden = self(input_ids, attention_mask, token_type_ids)
        return self.mlm_head(hidden, self.tok_emb.weight)

    def pooled(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """BERT's pooled output: tanh(dense(hidden of the first token)), [B, d_model]."""
        if self.pooler is None:
            raise ValueError("this encoder was built without a pooler (pooler=False)")
        hidden = self(input_ids, attention_mask, token_type_ids)
        return torch.tanh(self.pooler(hidden[:, 0]))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
