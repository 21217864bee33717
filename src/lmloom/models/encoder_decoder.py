"""A T5 encoder-decoder (Raffel et al., 2020) composed from `blocks.py`.

One token embedding (`shared`) feeds both stacks; there are no absolute positions. Instead each stack
learns a relative position bias: every (query, key) distance falls in one of `relative_attention_num_buckets`
buckets (exact for short distances, logarithmic up to `relative_attention_max_distance`), and each bucket
holds one scalar per head that is added to the attention logits. The bias is computed once, by the first
layer's table, and shared by every layer of the stack.

Encoder layer: pre-norm self-attention, then pre-norm feed-forward. Decoder layer: pre-norm causal
self-attention (unidirectional buckets), pre-norm cross-attention over the encoder output (no position
bias), then pre-norm feed-forward. All norms are T5's RMS LayerNorm (scale, no bias, no mean), no linear
has a bias, and attention logits are not divided by sqrt(d_kv) (T5's init absorbs that factor).

Two flavours, both in `T5Config`:
- T5 1.0: ReLU feed-forward, LM head tied to the embedding, and the decoder output scaled by d_model**-0.5
  before it (the embedding is N(0, 1), so the logits would otherwise be d_model**0.5 too large);
- T5 v1.1: "gated-gelu" feed-forward (tanh-GELU gate times a linear), untied LM head, no rescale.

The same function as Hugging Face `T5ForConditionalGeneration`; `hf_t5.py` maps configs and weights.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lmloom.models.blocks import MLP, Attention, BlockConfig, Norm, TransformerBlock
from lmloom.models.decoder import IGNORE_INDEX

FeedForward = Literal["relu", "gated-gelu"]

# Published sizes: (d_model, d_kv, d_ff, n_layers, n_heads, feed_forward, tie_word_embeddings, vocab_size).
# The decoder has as many layers as the encoder in all of them. "tiny*" are for tests and smoke runs.
_T5_VOCAB = 32128
PRESETS: dict[str, tuple[int, int, int, int, int, FeedForward, bool, int]] = {
    "tiny": (64, 16, 128, 2, 4, "relu", True, 512),
    "tiny-v1_1": (64, 16, 96, 2, 4, "gated-gelu", False, 512),
    "t5-small": (512, 64, 2048, 6, 8, "relu", True, _T5_VOCAB),
    "t5-base": (768, 64, 3072, 12, 12, "relu", True, _T5_VOCAB),
    "t5-large": (1024, 64, 4096, 24, 16, "relu", True, _T5_VOCAB),
    "t5-v1_1-small": (512, 64, 1024, 8, 6, "gated-gelu", False, _T5_VOCAB),
    "t5-v1_1-base": (768, 64, 2048, 12, 12, "gated-gelu", False, _T5_VOCAB),
    "t5-v1_1-large": (1024, 64, 2816, 24, 16, "gated-gelu", False, _T5_VOCAB),
}


class T5Config(BaseModel):
    """Shape and numerics of a `T5`. Defaults are t5-small (T5 1.0)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(_T5_VOCAB, ge=1)
    d_model: int = Field(512, ge=1)
    d_kv: int = Field(64, ge=1, description="per-head size; n_heads * d_kv need not equal d_model")
    d_ff: int = Field(2048, ge=1)
    n_layers: int = Field(6, ge=1, description="encoder layers")
    n_decoder_layers: int | None = Field(None, ge=1, description="None = n_layers")
    n_heads: int = Field(8, ge=1)
    relative_attention_num_buckets: int = Field(32, ge=4)
    relative_attention_max_distance: int = Field(128, ge=2)
    feed_forward: FeedForward = "relu"
    layer_norm_eps: float = Field(1e-6, gt=0)
    tie_word_embeddings: bool = Field(
        True, description="LM head = the shared embedding, decoder output scaled by d_model**-0.5 (T5 1.0)"
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="embeddings, residual branches, attention, final norms"
    )
    decoder_start_token_id: int = Field(0, ge=0)
    pad_id: int = Field(0, ge=0)
    init_factor: float = Field(1.0, gt=0, description="scales every init std, as HF's initializer_factor")

    @model_validator(mode="after")
    def _check(self) -> T5Config:
        for name in ("decoder_start_token_id", "pad_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(
                    f"{name} {getattr(self, name)} is outside the vocabulary ({self.vocab_size})"
                )
        # Bidirectional buckets halve the count, and half of those again are the exact ones: at least one.
        if self.relative_attention_num_buckets // 4 < 1:
            raise ValueError("relative_attention_num_buckets must be at least 4")
        return self

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @classmethod
    def preset(cls, name: str, **overrides) -> T5Config:
        """A named size (see `PRESETS`); `overrides` set any other field."""
        if name not in PRESETS:
            raise ValueError(f"unknown T5 preset {name!r}; choose from {sorted(PRESETS)}")
        d_model, d_kv, d_ff, n_layers, n_heads, feed_forward, tied, vocab = PRESETS[name]
        fields = {
            "d_model": d_model,
            "d_kv": d_kv,
            "d_ff": d_ff,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "feed_forward": feed_forward,
            "tie_word_embeddings": tied,
            "vocab_size": vocab,
        }
        return cls(**(fields | overrides))

    def block_config(self) -> BlockConfig:
        """The wiring of every encoder layer, and of the decoder layers' sublayers."""
        return BlockConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            ffn_hidden=self.d_ff,
            head_dim=self.d_kv,
            norm="rmsnorm",
            norm_eps=self.layer_norm_eps,
            norm_bias=False,
            activation="relu" if self.feed_forward == "relu" else "geglu_tanh",
            bias=False,
            norm_position="pre",
            dropout=self.dropout,
            attn_dropout=self.dropout,
            attn_scale=1.0,
        )


def relative_position_bucket(
    relative_position: torch.Tensor,
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """The bucket [0, num_buckets) of each relative position (key position - query position).

    Bidirectional (encoder): half the buckets are for keys after the query, half for keys at or before it.
    Causal (decoder): only keys at or before the query matter; later ones share bucket 0 (they are masked).
    Within a half, the first half of the buckets hold one distance each; the rest cover distances up to
    max_distance in logarithmically wider bins, and everything farther shares the last bucket.
    """
    if bidirectional:
        num_buckets //= 2
        direction_offset = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        direction_offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    n_exact = num_buckets // 2
    # clamp(min=1): log(0) would be -inf, whose cast to long is undefined; those distances are exact anyway.
    # Same float32 operations in the same order as T5's reference, so bin edges round the same way.
    log_fraction = torch.log(distance.clamp(min=1).float() / n_exact) / math.log(max_distance / n_exact)
    log_bucket = n_exact + (log_fraction * (num_buckets - n_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return direction_offset + torch.where(distance < n_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention logits: [1, heads, queries, keys]."""

    def __init__(self, cfg: T5Config, *, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.table = nn.Embedding(self.num_buckets, cfg.n_heads)

    def forward(self, n_queries: int, n_keys: int) -> torch.Tensor:
        device = self.table.weight.device
        query = torch.arange(n_queries, device=device)[:, None]
        key = torch.arange(n_keys, device=device)[None, :]
        buckets = relative_position_bucket(
            key - query,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.table(buckets).permute(2, 0, 1).unsqueeze(0)


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] with 1 for tokens and 0 for padding -> boolean [B, 1, 1, S]: no query attends to padding."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be [batch, keys] (1 token / 0 pad), got {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, None, None, :].bool()


class T5Encoder(nn.Module):
    """Embedded tokens -> encoder hidden states; pre-norm blocks, one position bias for all layers."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.dropout = cfg.dropout
        block = cfg.block_config()
        self.relative_bias = RelativePositionBias(cfg, bidirectional=True)
        self.layers = nn.ModuleList(TransformerBlock(block) for _ in range(cfg.n_layers))
        self.final_norm = Norm("rmsnorm", cfg.d_model, eps=cfg.layer_norm_eps, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        bias, mask = self.relative_bias(T, T), _key_mask(attention_mask)
        x = F.dropout(x, self.dropout, training=self.training)
        for layer in self.layers:
            x = layer(x, mask=mask, position_bias=bias)
        return F.dropout(self.final_norm(x), self.dropout, training=self.training)


class T5DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, feed-forward; each pre-norm with a
    residual. Names follow `TransformerBlock` (attn, mlp) with `cross_attn` added between them."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg

        def attention() -> Attention:
            return Attention(
                cfg.d_model,
                cfg.n_heads,
                head_dim=cfg.head_dim,
                bias=cfg.bias,
                dropout=cfg.attn_dropout,
                scale=cfg.attn_scale,
            )

        def norm() -> nn.Module:
            return Norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=False)

        self.attn, self.attn_norm = attention(), norm()
        self.cross_attn, self.cross_attn_norm = attention(), norm()
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden, activation=cfg.activation, bias=cfg.bias)
        self.mlp_norm = norm()

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.cfg.dropout, training=self.training)

    def forward(
        self,
        x: torch.Tensor,
        encoder_out: torch.Tensor,
        *,
        self_mask: torch.Tensor | None,
        cross_mask: torch.Tensor | None,
        position_bias: torch.Tensor,
    ) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), mask=self_mask, position_bias=position_bias, is_causal=True)
        x = x + self._drop(h)
        x = x + self._drop(self.cross_attn(self.cross_attn_norm(x), mask=cross_mask, context=encoder_out))
        return x + self._drop(self.mlp(self.mlp_norm(x)))


class T5Decoder(nn.Module):
    """Embedded decoder tokens + encoder output -> decoder hidden states (final norm applied)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.dropout = cfg.dropout
        block = cfg.block_config()
        self.relative_bias = RelativePositionBias(cfg, bidirectional=False)
        self.layers = nn.ModuleList(T5DecoderLayer(block) for _ in range(cfg.decoder_layers))
        self.final_norm = Norm("rmsnorm", cfg.d_model, eps=cfg.layer_norm_eps, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        encoder_out: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = x.shape[1]
        bias = self.relative_bias(T, T)
        self_mask, cross_mask = _key_mask(attention_mask), _key_mask(encoder_attention_mask)
        x = F.dropout(x, self.dropout, training=self.training)
        for layer in self.layers:
            x = layer(x, encoder_out, self_mask=self_mask, cross_mask=cross_mask, position_bias=bias)
        return F.dropout(self.final_norm(x), self.dropout, training=self.training)


class T5(nn.Module):
    """Encoder-decoder: (input_ids, decoder_input_ids) -> logits [B, Td, vocab], or the mean loss."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = cfg = config
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Encoder(cfg)
        self.decoder = T5Decoder(cfg)
        # Tied: the head is `shared.weight` itself (no second parameter, so no alias in the state dict).
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Mesh TensorFlow's T5 init (as HF's): N(0, 1) embeddings and head, each projection N(0, fan_in**-0.5)
        with the query's extra d_kv**-0.5 standing in for the missing attention scale; norms 1."""
        cfg, f = self.config, self.config.init_factor
        nn.init.normal_(self.shared.weight, std=f)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=f)
        for module in self.modules():
            if isinstance(module, Attention):
                nn.init.normal_(module.q.weight, std=f * (cfg.d_model * cfg.d_kv) ** -0.5)
                nn.init.normal_(module.k.weight, std=f * cfg.d_model**-0.5)
                nn.init.normal_(module.v.weight, std=f * cfg.d_model**-0.5)
                nn.init.normal_(module.proj.weight, std=f * (cfg.n_heads * cfg.d_kv) ** -0.5)
            elif isinstance(module, MLP):
                for up in (module.up, module.gate):
                    if up is not None:
                        nn.init.normal_(up.weight, std=f * cfg.d_model**-0.5)
                nn.init.normal_(module.down.weight, std=f * cfg.d_ff**-0.5)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.table.weight, std=f * cfg.d_model**-0.5)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder hidden states [B, Te, d_model]; attention_mask [B, Te] is 1 for tokens, 0 for padding."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_out: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, Td, vocab] for the decoder inputs given the encoder output (and its padding mask)."""
        hidden = self.decoder(
            self.shared(decoder_input_ids), encoder_out, decoder_attention_mask, attention_mask
        )
        if self.lm_head is None:
            return F.linear(hidden * self.config.d_model**-0.5, self.shared.weight)
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, Td, vocab_size]; with targets [B, Td], the mean cross-entropy over the targets that are
        not IGNORE_INDEX instead. Masks are [B, T] with 1 for tokens and 0 for padding."""
        encoder_out = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask)
        if targets is None:
            return logits
        # float32 loss: a bf16 log-softmax over 32k classes loses the small probabilities.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs for labels [B, Td]: decoder_start_token_id, then the labels without
        their last token; IGNORE_INDEX becomes pad_id (as HF's `_shift_right`)."""
        start = labels.new_full((*labels.shape[:-1], 1), self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[..., :-1]], dim=-1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_id)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = [
    "PRESETS",
    "FeedForward",
    "RelativePositionBias",
    "T5",
    "T5Config",
    "T5Decoder",
    "T5DecoderLayer",
    "T5Encoder",
    "relative_position_bucket",
]
