"""Readable transformer building blocks shared by the encoder (BERT) and the models to come (GPT-2, T5).

Written for clarity and Hugging Face parity, not speed (`decoder.py` is the speed-tuned one): separate
q/k/v projections, torch's `scaled_dot_product_attention`, plain `nn.Linear` / `nn.LayerNorm` /
`nn.RMSNorm` parameters with stable state_dict names. What is here:

- `Norm`: LayerNorm (with or without bias) or RMSNorm;
- `MLP`: GELU (exact erf or tanh approximation), ReLU, SwiGLU, or GEGLU (T5 v1.1); biases on or off;
- `Attention`: multi-head, grouped-query or multi-query (`n_kv_heads`), an optional boolean or additive
  mask, an optional additive position bias (T5), causal or not, self- or cross-attention, optional RoPE;
- positions: `LearnedPositions`, `sinusoidal_positions` / `SinusoidalPositions`, `RotaryEmbedding`;
- `TransformerBlock`: pre-norm or post-norm (BERT), optionally attention and MLP in parallel (PaLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormKind = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu_tanh"]
# Gated activations: act(gate(x)) * up(x), so the MLP gets a third projection.
GATED_ACTIVATIONS = ("swiglu", "geglu_tanh")
NormPosition = Literal["pre", "post"]


def Norm(kind: NormKind, dim: int, *, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """A normalisation layer over the last dim. Named like a class: call sites read as module constructors.

    `bias` only applies to LayerNorm (RMSNorm has none): GPT-2 / BERT use it, some newer models drop it.
    """
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        if bias:
            raise ValueError("RMSNorm has no bias; pass bias=False")
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'layernorm' or 'rmsnorm'")


def activate(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The pointwise activations of `MLP` (SwiGLU's gate excepted, which needs two inputs)."""
    if activation == "gelu":
        return F.gelu(x)  # exact, erf-based: BERT's "gelu"
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")  # GPT-2's "gelu_new"
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"activation {activation!r} is not pointwise")


class MLP(nn.Module):
    """Position-wise feed-forward: `down(act(up(x)))`, or gated `down(act(gate(x)) * up(x))`: SwiGLU (silu)
    or GEGLU with the tanh GELU (T5 v1.1's "gated-gelu")."""

    def __init__(self, d_model: int, hidden: int, *, activation: Activation = "gelu", bias: bool = True):
        super().__init__()
        if activation not in ("gelu", "gelu_tanh", "relu", *GATED_ACTIVATIONS):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.gate = nn.Linear(d_model, hidden, bias=bias) if activation in GATED_ACTIVATIONS else None
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            gate = self.gate(x)
            gate = F.silu(gate) if self.activation == "swiglu" else F.gelu(gate, approximate="tanh")
            return self.down(gate * self.up(x))
        return self.down(activate(self.up(x), self.activation))


# --- positions -----------------------------------------------------------------------------------------


class LearnedPositions(nn.Module):
    """Absolute position embeddings as a trained table [max_positions, dim] (BERT, GPT-2)."""

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        """Rows offset .. offset + seq_len - 1, [seq_len, dim]."""
        if offset + seq_len > self.weight.shape[0]:
            raise ValueError(
                f"positions up to {offset + seq_len - 1} exceed the table of {self.weight.shape[0]}"
            )
        return self.weight[offset : offset + seq_len]


def sinusoidal_positions(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed encodings of "Attention Is All You Need", [n_positions, dim] float32:
    PE[p, 2i] = sin(p / base^(2i / dim)), PE[p, 2i + 1] = cos(p / base^(2i / dim))."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    # float64 angles: at thousands of positions float32 loses the low digits of p * freq.
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).float()


class SinusoidalPositions(nn.Module):
    """`sinusoidal_positions` as a module with the `LearnedPositions` call signature; no parameters."""

    def __init__(self, max_positions: int, dim: int, base: float = 10000.0):
        super().__init__()
        # Not persistent: derived from the arguments, so it stays out of state_dict().
        self.register_buffer("table", sinusoidal_positions(max_positions, dim, base), persistent=False)

    def forward(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        if offset + seq_len > self.table.shape[0]:
            raise ValueError(
                f"positions up to {offset + seq_len - 1} exceed the table of {self.table.shape[0]}"
            )
        return self.table[offset : offset + seq_len]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE tables and their application, in Hugging Face's layout: dim i is paired with i + head_dim / 2
    (`rotate_half`), so HF checkpoints load without permuting q/k rows (`decoder.py` pairs 2i, 2i+1)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # [max_positions, head_dim], halves repeated
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x [..., T, head_dim] rotated by the angles of positions offset .. offset + T - 1."""
        T = x.shape[-2]
        cos, sin = self.cos[offset : offset + T], self.sin[offset : offset + T]
        return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


# --- attention -----------------------------------------------------------------------------------------


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as an additive one; additive masks pass through."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    # The dtype's lowest value, not -inf: a query that may attend nothing gets uniform weights, not NaN.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )


def causal_mask(n_queries: int, n_keys: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean [n_queries, n_keys], True where query i may see key j; the queries are the last positions."""
    q = torch.arange(n_keys - n_queries, n_keys, device=device)
    return q[:, None] >= torch.arange(n_keys, device=device)[None, :]


def check_attention_mask(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """A [B, T, T] or [B, 1, T, T] boolean mask as [B, 1, T, T] (one mask for every head)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"attention_mask must be boolean (True = may attend), got {mask.dtype}")
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (length, length):
        raise ValueError(
            f"attention_mask must be [B, {length}, {length}] or [B, 1, {length}, {length}], "
            f"got {tuple(mask.shape)}"
        )
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask batch {mask.shape[0]} does not match the {batch} sequences")
    return mask


class Attention(nn.Module):
    """Scaled dot-product attention with separate q/k/v projections.

    n_kv_heads < n_heads is grouped-query attention (1 = multi-query): each key/value head serves
    n_heads / n_kv_heads consecutive query heads, as in Hugging Face's `repeat_kv`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        scale: float | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({n_heads})")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
            head_dim = d_model // n_heads
        self.head_dim, self.dropout = head_dim, dropout
        # None = 1/sqrt(head_dim); T5 uses 1.0 (its init absorbs the scaling).
        self.scale = scale
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k = nn.Linear(d_model, self.n_kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(d_model, self.n_kv_heads * head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[B, T, n * D] -> [B, n, T, D]."""
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model].

        mask: broadcastable to [B, heads, T, S]; boolean (True = may attend) or additive (0 / large negative).
        position_bias: additive, broadcastable to [B, heads, T, S] (T5's relative buckets).
        context: keys and values come from it [B, S, d_model] (cross-attention); default x.
        rotary: rotates q and k by their positions (self-attention without a cache: both start at 0).
        """
        B, T, _ = x.shape
        source = x if context is None else context
        q = self._heads(self.q(x), self.n_heads)
        k = self._heads(self.k(source), self.n_kv_heads)
        v = self._heads(self.v(source), self.n_kv_heads)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        attn_mask = None
        if position_bias is not None or (mask is not None and is_causal):
            # SDPA takes either a mask or is_causal, and only one mask: fold everything into one additive.
            attn_mask = torch.zeros((), dtype=q.dtype, device=q.device)
            if is_causal:
                attn_mask = attn_mask + _additive(causal_mask(T, k.shape[2], q.device), q.dtype)
            if mask is not None:
                attn_mask = attn_mask + _additive(mask, q.dtype)
            if position_bias is not None:
                attn_mask = attn_mask + position_bias.to(q.dtype)
            # Two "lowest value" terms sum to -inf; clamped, a fully masked row stays finite.
            attn_mask = attn_mask.clamp(min=torch.finfo(q.dtype).min)
            is_causal = False
        elif mask is not None:
            attn_mask = _additive(mask, q.dtype)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.proj(y.transpose(1, 2).flatten(2))


# --- block ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """Shape and wiring of one `TransformerBlock`."""

    d_model: int
    n_heads: int
    ffn_hidden: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    activation: Activation = "gelu"
    bias: bool = True
    norm_position: NormPosition = "pre"
    # PaLM / GPT-J: attention and MLP read the same (normed) input and both add to the residual.
    parallel: bool = False
    dropout: float = 0.0  # on each residual branch
    attn_dropout: float = 0.0  # on the attention probabilities
    attn_scale: float | None = None


class TransformerBlock(nn.Module):
    """Attention then MLP, each with a residual connection and a norm.

    pre-norm (GPT-2, Llama): x + f(norm(x)). post-norm (BERT, original Transformer): norm(x + f(x)).
    parallel: one norm and one residual add for both branches, x + attn(n(x)) + mlp(n(x)) (pre) or
    norm(x + attn(x) + mlp(x)) (post); `mlp_norm` is then None.
    """

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(
            cfg.d_model,
            cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            bias=cfg.bias,
            dropout=cfg.attn_dropout,
            scale=cfg.attn_scale,
        )
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden, activation=cfg.activation, bias=cfg.bias)
        norm_bias = cfg.norm_bias and cfg.norm == "layernorm"
        self.attn_norm = Norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=norm_bias)
        self.mlp_norm = (
            None if cfg.parallel else Norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=norm_bias)
        )

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.cfg.dropout, training=True) if self.cfg.dropout and self.training else x

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        is_causal: bool = False,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        def attend(h: torch.Tensor) -> torch.Tensor:
            out = self.attn(h, mask=mask, position_bias=position_bias, is_causal=is_causal, rotary=rotary)
            return self._drop(out)

        def feed_forward(h: torch.Tensor) -> torch.Tensor:
            return self._drop(self.mlp(h))

        pre = self.cfg.norm_position == "pre"
        if self.mlp_norm is None:  # parallel
            if pre:
                h = self.attn_norm(x)
                return x + attend(h) + feed_forward(h)
            return self.attn_norm(x + attend(x) + feed_forward(x))
        if pre:
            x = x + attend(self.attn_norm(x))
            return x + feed_forward(self.mlp_norm(x))
        x = self.attn_norm(x + attend(x))
        return self.mlp_norm(x + feed_forward(x))


def init_normal_(module: nn.Module, std: float) -> None:
    """BERT / GPT-2 init for a module tree: Linear and Embedding weights N(0, std), biases 0, norms 1 / 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding | LearnedPositions):
                nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm | nn.RMSNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)


__all__ = [
    "Activation",
    "Attention",
    "BlockConfig",
    "GATED_ACTIVATIONS",
    "LearnedPositions",
    "MLP",
    "Norm",
    "NormKind",
    "NormPosition",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "TransformerBlock",
    "activate",
    "causal_mask",
    "check_attention_mask",
    "init_normal_",
    "rotate_half",
    "sinusoidal_positions",
]
