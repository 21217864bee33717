"""A Llama-style decoder-only transformer in one readable file.

Pre-norm blocks (RMSNorm -> attention with RoPE -> residual, RMSNorm -> SwiGLU MLP -> residual), no biases,
LM head tied to the token embedding; `parallel=True` gives PaLM's block (attention and MLP read one norm and
add to the residual together). The same function as Hugging Face `LlamaForCausalLM` (`hf_llama.py` maps
the weights) and as the readable blocks of `blocks.py` in the Llama wiring (a test pins both); it is the
Llama/PaLM preset of the model family, kept in its own file because of how it is computed, each choice
measured on CPU training:

- one matmul for q, k and v; RoPE as one complex multiply on q and k together, with a hand-written
  backward that assembles d(qkv) in one buffer (`_RotaryQKV`);
- a chunked LM head + cross-entropy that never holds the logits of the whole batch (`linear_cross_entropy`);
- under torch.compile on CPU, exact causal attention from matmuls that skips masked blocks
  (`blocked_causal_attention`), which inductor fuses better than SDPA's CPU kernel runs; in eager float32
  CPU training the same idea as a hand-written autograd Function (`_CausalAttention`);
- under torch.compile on CPU, RoPE in plain ops on contiguous halves of each head (the q/k rows of the
  projection's weight reordered per head, `Attention._forward_compiled`), and the weight gradients of
  the projections with more outputs than inputs as (x.T @ dy).T (`_WideLinear`);
- in eager float32 on CPU, the forward and input-gradient GEMMs of the projections and the LM head through
  oneDNN instead of MKL (`_linear`, `_gemm_xwt`), faster on the AMD CPU measured;
- backward writes gradients into the memory of activations it no longer needs (`_RotaryQKV`, `_SwiGLU`):
  on CPU fresh memory costs a page fault per 4 KiB. So a second backward through the same graph
  (`retain_graph=True`) is refused with autograd's "modified by an inplace operation" error.

`forward` takes an optional boolean attention mask that replaces the causal one (prefix LM); with it,
attention runs through SDPA with that mask.

Parallelism, adapters and privacy wrappers are applied from outside: the parameters are those of plain
`nn.Linear` / `nn.Embedding` / `nn.RMSNorm` modules, with stable state_dict names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lmloom.models.blocks import check_attention_mask

IGNORE_INDEX = -100
# Compiled CPU training at up to this many positions uses `blocked_causal_attention` instead of SDPA.
BLOCKED_ATTENTION_MAX_LEN = 1024
_QUERY_BLOCK = 128
_EAGER_QUERY_BLOCK = 64  # `_CausalAttention`'s

# Named sizes, (n_layers, d_model, n_heads, n_kv_heads, ffn_hidden); ffn_hidden None = 8/3 * d_model.
# "tiny" is for tests and CPU smoke runs; "1b" is TinyLlama-1.1B's shape, "7b" Llama-2-7B's.
PRESETS: dict[str, tuple[int, int, int, int | None, int | None]] = {
    "tiny": (2, 128, 4, None, None),
    "small": (4, 256, 4, None, None),  # the quickstart's model
    "125m": (12, 768, 12, None, None),
    "350m": (24, 1024, 16, None, None),
    "1b": (22, 2048, 32, 4, 5632),
    "7b": (32, 4096, 32, None, 11008),
}


class DecoderConfig(BaseModel):
    """Shape and numerics of a `Decoder`. Derived sizes: `head_dim`, `kv_heads`, `hidden_dim`."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(32000, ge=1)
    seq_len: int = Field(2048, ge=1, description="maximum number of positions (RoPE table length)")
    d_model: int = Field(768, ge=1)
    n_layers: int = Field(12, ge=1)
    n_heads: int = Field(12, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="None = n_heads; fewer = grouped-query attention")
    ffn_hidden: int | None = Field(None, ge=1, description="None = 8/3 * d_model rounded up to multiple_of")
    multiple_of: int = Field(64, ge=1)
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    parallel: bool = Field(False, description="PaLM's parallel block: x + attn(norm(x)) + mlp(norm(x))")

    @classmethod
    def preset(cls, name: str, **overrides) -> DecoderConfig:
        """A named size (see PRESETS: tiny, small, 125m, 350m, 1b, 7b); `overrides` set any other field."""
        if name not in PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}; choose from {sorted(PRESETS)}")
        n_layers, d_model, n_heads, n_kv_heads, ffn_hidden = PRESETS[name]
        shape = dict(
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_hidden=ffn_hidden
        )
        return cls(**(shape | overrides))

    @model_validator(mode="after")
    def _check_shapes(self) -> DecoderConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotation angles, [seq_len, head_dim // 2] (Llama's frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x with each pair of adjacent dims (2i, 2i+1) rotated by the angle with this cos/sin."""
    if torch.compiler.is_compiling():
        # Inductor has no complex codegen; it fuses this real form into a single kernel.
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return out.copy_(torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2))
    # Eager: one complex multiply, 3x faster on CPU than the real rotate-half form, whose 32-wide
    # half-head slices defeat vectorisation; written straight into `out` when that is float32.
    x = x.float()
    if x.stride(-1) != 1:  # e.g. a gradient that arrives transposed
        x = x.contiguous()
    x_c, rot = torch.view_as_complex(x.unflatten(-1, (-1, 2))), torch.complex(cos, sin)
    if out.dtype == torch.float32:
        torch.mul(x_c, rot, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
    else:
        out.copy_(torch.view_as_real(x_c * rot).flatten(-2))
    return out


class _RotaryQKV(torch.autograd.Function):
    """Split the fused projection [B, T, H + 2*Hkv, D] into q, k, v [B, heads, T, D], rotating q and k.

    backward() writes d(qkv) into the projection's own buffer, dead by then (v was a view of it): fresh CPU
    memory costs a page fault per 4 KiB, and autograd's slicing backward would instead zero-fill a full
    d(qkv) for each of q, k and v and add them up.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_heads, n_kv_heads):
        H, Hkv = n_heads, n_kv_heads
        qk = qkv[:, :, : H + Hkv]
        qk = _rotate(qk, cos, sin, out=torch.empty_like(qk, memory_format=torch.contiguous_format))
        ctx.save_for_backward(qkv, cos, sin)
        ctx.heads = (H, Hkv)
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        dqkv, cos, sin = ctx.saved_tensors
        H, Hkv = ctx.heads
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)  # back to [B, T, heads, D]
        _rotate(dq, cos, -sin, out=dqkv[:, :, :H])  # rotating back: the angle negated
        _rotate(dk, cos, -sin, out=dqkv[:, :, H : H + Hkv])
        dqkv[:, :, H + Hkv :] = dv
        return dqkv, None, None, None, None


_onednn_linear = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


def _gemm_xwt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T through oneDNN (w [out, in], any strides): on this project's CPU (AMD, AVX-512) it ran fp32
    GEMMs at ~100 GFLOP/s against MKL's ~85 on one core and ~1.7x MKL's throughput per core on two."""
    return _onednn_linear(x, w, None, "none", [], "")


class _Linear(torch.autograd.Function):
    """x @ w.T for 2-D x, no bias; the forward and input-gradient GEMMs through oneDNN (see `_gemm_xwt`)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _gemm_xwt(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = _gemm_xwt(dy, w.t()) if ctx.needs_input_grad[0] else None
        dw = dy.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dw


class _WideLinear(torch.autograd.Function):
    """x @ w.T for w [out, in] with out > in, under torch.compile: F.linear's arithmetic (under autocast both
    operands cast, as autocast casts them for F.linear), but the weight gradient computed as (x.T @ dy).T,
    [in, out] rows, not dy.T @ x: oneDNN ran it ~7% faster in bf16 at [4096, 256] x [4096, 704..768]."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.dtypes = x.dtype, w.dtype
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, w = x.to(dtype), w.to(dtype)
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = (dy @ w).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (x.flatten(0, -2).t() @ dy.flatten(0, -2)).t()
            dw = dw.to(ctx.dtypes[1], memory_format=torch.contiguous_format)  # a gradient laid out as w
        return dx, dw


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), through `_Linear` when that computes the same thing faster: a plain bias-free nn.Linear
    with no hooks, in eager float32 on CPU; under torch.compile, through `_WideLinear` for such a module
    with more outputs than inputs. Wrapped or hooked modules (LoRA, tensor parallel, privacy hooks) and
    eager autocast call the module as usual."""
    if (
        _onednn_linear is not None
        and type(module) is nn.Linear
        and module.bias is None
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and type(module.weight) is nn.Parameter
        and module.weight.dtype == torch.float32
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        # 2-D inside the Function: an output that is a view would block `_RotaryQKV`'s in-place backward.
        return _Linear.apply(x.reshape(-1, x.shape[-1]), module.weight).view(*x.shape[:-1], -1)
    if torch.compiler.is_compiling() and _plain_linear(module) and module.out_features > module.in_features:
        return _WideLinear.apply(x, module.weight)
    return module(x)


class KVCache:
    """Preallocated keys and values, [batch, kv_heads, max_len, head_dim] per layer."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kv_heads, T, head_dim] at start_pos; return everything cached up to the new end."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        # q, k and v from one matmul (HF's three weights stacked): one output buffer for RoPE and gradient.
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_bias: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.kv_heads
        if attn_bias is not None and _plain_linear(self.qkv):
            return self._forward_compiled(x, cos, sin, attn_bias)
        qkv = _linear(self.qkv, x).view(B, T, H + 2 * Hkv, self.head_dim)
        # [B, heads, T, D] strided views (SDPA reads them without a copy); q and k rotated in one pass.
        q, k, v = _RotaryQKV.apply(qkv, cos, sin, H, Hkv)
        mask, is_causal = None, T > 1
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)
            if start_pos > 0 and T > 1:  # a chunk after a prefix: causal within the chunk, sees the prefix
                pos = torch.arange(start_pos + T, device=x.device)
                mask, is_causal = pos[None, :] <= pos[start_pos:, None], False
        if attention_mask is not None:  # replaces causality (prefix LM); checked by Decoder.forward
            mask, is_causal = attention_mask, False
        if attn_bias is not None:
            y = blocked_causal_attention(q, k, v, attn_bias)
        elif (
            is_causal
            and mask is None
            and kv_cache is None
            and H == Hkv
            and not (self.dropout and self.training)
            and q.dtype == torch.float32
            and q.device.type == "cpu"
            and q.requires_grad
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        ):  # eager float32 CPU training
            bias = torch.full((_EAGER_QUERY_BLOCK,) * 2, float("-inf"), device=q.device).triu(1)
            y = _CausalAttention.apply(q, k, v, bias, _EAGER_QUERY_BLOCK)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                enable_gqa=H != Hkv,
                dropout_p=self.dropout if self.training else 0.0,
            )
        return _linear(self.proj, y.transpose(1, 2).reshape(B, T, H * self.head_dim))

    def _forward_compiled(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor
    ) -> torch.Tensor:
        """Causal self-attention as torch.compile on CPU computes it best (a plain qkv projection without
        hooks): RoPE in plain tensor ops instead of `_RotaryQKV`, whose backward writes into its saved
        buffer, so that inductor writes q, k and v once in the layout the attention GEMMs read and fuses
        RoPE and its gradient into the kernels around them (this halved the RoPE kernels' time).

        RoPE pairs dims (2i, 2i+1); read that way (stride 2) inductor's kernels do not vectorise. So the q
        and k rows of the projection's weight are reordered per head to (i, i + D/2) first: the same
        rotation then works on two contiguous halves, and q . k, a sum over the dims of a head, does not
        depend on their order as long as q and k share it. Only the weight is permuted, not activations.
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.kv_heads, self.head_dim
        w = self.qkv.weight
        n_qk = (H + Hkv) * D
        w_qk = w[:n_qk].unflatten(0, (H + Hkv, D // 2, 2)).transpose(1, 2).reshape(n_qk, -1)
        qkv = _WideLinear.apply(x, torch.cat((w_qk, w[n_qk:]))).view(B, T, H + 2 * Hkv, D)
        # The halves as a dim of their own, [.., 2, D/2], and the rotation as one pointwise expression
        # (x1 cos - x2 sin, x2 cos + x1 sin): no slices or concatenation, which inductor would realise.
        halves = qkv[:, :, : H + Hkv].unflatten(-1, (2, D // 2)).float()
        signed_sin = torch.stack((-sin, sin), dim=-2)
        qk = (halves * cos.unsqueeze(-2) + halves.flip(-2) * signed_sin).to(qkv.dtype).flatten(-2)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        v = qkv[:, :, H + Hkv :].transpose(1, 2)
        y = blocked_causal_attention(q, k, v, attn_bias)
        return _linear(self.proj, y.transpose(1, 2).reshape(B, T, H * D))


def _plain_linear(module: nn.Module) -> bool:
    """A bias-free nn.Linear with a plain weight and no hooks: one whose weight may be used directly."""
    return (
        type(module) is nn.Linear
        and module.bias is None
        and type(module.weight) is nn.Parameter
        and not (
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
        )
    )


def blocked_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Exact causal attention from matmuls and softmax, meant for torch.compile on CPU at short lengths.

    Each block of queries is multiplied only with the keys it may see (a quarter of the work skipped at two
    blocks, more with more), and inductor fuses each block's mask + softmax into one kernel. Fwd + bwd in
    bf16 this ran 2x faster than SDPA's CPU flash kernel at T=256 and 1.4x at T=1024; its memory grows
    with T^2, hence BLOCKED_ATTENTION_MAX_LEN. `bias` [T, T] is 0 on and below the diagonal, -inf above:
    a buffer, because inductor vectorises a load better than the index arithmetic of an inline triu.
    """
    B, H, T, D = q.shape
    if k.shape[1] != H:  # grouped-query attention: every query head gets its key/value head
        k, v = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (k, v))
    return _BlockedAttention.apply(q * D**-0.5, k, v, bias, _QUERY_BLOCK)


class _BlockedAttention(torch.autograd.Function):
    """`blocked_causal_attention`'s blocks with their backward written out, for inductor: every gradient
    comes out of its GEMM as rows [.., T, D], the layout the kernels after it read (autograd's own
    derivation yields d(k^T) [D, T], which inductor then read transposed, one element at a time). The
    arithmetic is autograd's (float32 softmax and softmax backward, GEMMs in the inputs' dtype). Backward
    recomputes the probabilities from the saved scores and row max and sum, exactly as forward computed
    them; under torch.compile the partitioner may keep forward's instead (it did, at the benchmark shape)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, block):
        B, H, T, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, T, D) for t in (q, k, v))
        outs, saved = [], []
        for s in range(0, T, block):
            e = min(s + block, T)
            scores = torch.bmm(q3[:, s:e], k3[:, :e].transpose(1, 2))
            x = scores.float() + bias[s:e, :e]
            row_max = x.amax(dim=-1, keepdim=True)
            exp = (x - row_max).exp()
            row_sum = exp.sum(dim=-1, keepdim=True)
            p = exp / row_sum
            outs.append(torch.bmm(p.to(v3.dtype), v3[:, :e]))
            saved += [scores, row_max, row_sum]
        ctx.save_for_backward(q3, k3, v3, bias, *saved)
        ctx.block, ctx.shape = block, (B, H, T, D)
        return torch.cat(outs, dim=1).view(B, H, T, D)

    @staticmethod
    def backward(ctx, d_out):
        q3, k3, v3, bias, *saved = ctx.saved_tensors
        B, H, T, D = ctx.shape
        d_out = d_out.reshape(B * H, T, D).to(v3.dtype)
        dq, dk, dv = [], None, None
        for i, s in enumerate(range(0, T, ctx.block)):
            e = min(s + ctx.block, T)
            scores, row_max, row_sum = saved[3 * i : 3 * i + 3]
            p = (scores.float() + bias[s:e, :e] - row_max).exp() / row_sum
            do = d_out[:, s:e]
            dv_i = torch.bmm(p.to(v3.dtype).transpose(1, 2), do)
            dp = torch.bmm(do, v3[:, :e].transpose(1, 2)).float()
            ds = (p * (dp - (dp * p).sum(dim=-1, keepdim=True))).to(q3.dtype)
            dq.append(torch.bmm(ds, k3[:, :e]))
            dk_i = torch.bmm(ds.transpose(1, 2), q3[:, s:e])
            if e < T:
                dk_i, dv_i = (F.pad(t, (0, 0, 0, T - e)) for t in (dk_i, dv_i))
            dk = dk_i if dk is None else dk + dk_i
            dv = dv_i if dv is None else dv + dv_i
        shape = (B, H, T, D)
        return torch.cat(dq, dim=1).view(shape), dk.view(shape), dv.view(shape), None, None


class _CausalAttention(torch.autograd.Function):
    """Exact causal attention (no GQA, no dropout) in eager float32 on CPU, one block of `block` queries at a
    time against only the keys it may see, probabilities kept for backward. Fwd + bwd at B=16, H=4, T=256,
    D=64 on one core: 42 ms against 53 ms for SDPA's CPU flash kernel (64-query blocks beat 32 and 128)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, block):
        B, H, T, D = q.shape
        q3 = torch.mul(q, D**-0.5, out=q.new_empty(B, H, T, D)).view(B * H, T, D)  # scaled, contiguous
        k3, v3 = k.reshape(B * H, T, D), v.reshape(B * H, T, D)
        out = q.new_empty(B * H, T, D)
        probs = []
        for s in range(0, T, block):
            e = min(s + block, T)
            scores = torch.bmm(q3[:, s:e], k3[:, :e].transpose(1, 2))
            scores[:, :, s:e] += bias[: e - s, : e - s]
            p = torch.softmax(scores, dim=-1)
            out[:, s:e] = torch.bmm(p, v3[:, :e])
            probs.append(p)
        ctx.save_for_backward(q3, k3, v3, out, *probs)
        ctx.block, ctx.shape = block, (B, H, T, D)
        return out.view(B, H, T, D)

    @staticmethod
    def backward(ctx, d_out):
        q3, k3, v3, out, *probs = ctx.saved_tensors
        BH, T, D = q3.shape
        block = ctx.block
        d_out = d_out.reshape(BH, T, D)
        delta = (d_out * out).sum(-1, keepdim=True)  # rowsum(dP * P) = rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q3), None, None
        for i in reversed(range(len(probs))):  # the last block sees every key: it starts dk and dv
            s = i * block
            e = min(s + block, T)
            p = probs[i]
            dv_i = torch.bmm(p.transpose(1, 2), d_out[:, s:e])
            d_scores = torch.bmm(d_out[:, s:e], v3[:, :e].transpose(1, 2)).sub_(delta[:, s:e]).mul_(p)
            dq[:, s:e] = torch.bmm(d_scores, k3[:, :e])
            dk_i = torch.bmm(d_scores.transpose(1, 2), q3[:, s:e])
            if dv is None:
                dk, dv = dk_i, dv_i
            else:
                dk[:, :e] += dk_i
                dv[:, :e] += dv_i
        shape = ctx.shape
        return dq.mul_(D**-0.5).view(shape), dk.view(shape), dv.view(shape), None, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, whose backward overwrites the saved gate and up with their gradients: the largest
    activations of the block are dead by then, and fresh CPU memory costs a page fault per 4 KiB."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # in place: silu's output is not needed for the gradients

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(up.mul_(grad), gate, grad_input=up)  # grad * up * silu'(gate)
        d_up = F.silu(gate, inplace=True).mul_(grad)
        return d_gate, d_up


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        # Separate gate and up: a fused [.., 2 * hidden] GEMM was no faster here and its larger buffers
        # cross glibc's 32 MiB mmap threshold sooner (fresh pages every step).
        self.gate = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.down, _SwiGLU.apply(_linear(self.gate, x), _linear(self.up, x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        # Parallel (PaLM): one norm feeds both branches, so there is no second one.
        self.mlp_norm = None if cfg.parallel else nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        attended = self._drop(self.attn(h, cos, sin, attn_bias, kv_cache, start_pos, attention_mask))
        if self.mlp_norm is None:
            return x + attended + self._drop(self.mlp(h))
        x = x + attended
        return x + self._drop(self.mlp(self.mlp_norm(x)))


def _compiled_chunk(logits, t_c, v_c, scale, need_grad, dtype):
    """One chunk's per-row losses and d(loss)/d(logits) in `dtype`, written for inductor: the one-hot of the
    gradient as a compare with an iota instead of scatter_add, so the whole chunk is one kernel of row
    passes that writes the low-precision gradient directly (scatter_add made inductor write the float32
    gradient, add into it, then convert it in another pass); the target logit by gather, one load a row
    (the iota compare there cost a pass over the chunk)."""
    hit = torch.arange(logits.shape[1], device=logits.device) == t_c
    target_logit = logits.gather(1, t_c).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    sum_exp = (logits - row_max).exp().sum(dim=1, keepdim=True)
    chunk_loss = ((row_max + sum_exp.log()).squeeze(1) - target_logit) * v_c
    if not need_grad:
        return chunk_loss, None
    dlogits = (logits - row_max).exp() * (scale / sum_exp) - torch.where(hit, scale, 0.0)
    return chunk_loss, dlogits.to(dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ w.T` against targets, computed `chunk` rows at a time.

    The logits of the whole batch (tokens x vocab, the largest tensor of a training step) never exist:
    each chunk's softmax becomes its gradient in place while it is still in cache, and the gradients of h
    and w are finished in the forward pass. backward() only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, h, w, targets, chunk, need_grad):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            hc, wc = h.to(dtype), w.to(dtype)
            valid = targets != IGNORE_INDEX
            n_valid = valid.sum().clamp(min=1)
            safe_targets = targets.clamp(min=0)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_grad else None
            grad_w = torch.zeros_like(w, dtype=torch.float32) if need_grad else None
            fast = (
                _onednn_linear is not None
                and dtype == torch.float32
                and device == "cpu"
                and not torch.compiler.is_compiling()
            )
            compiling = torch.compiler.is_compiling()
            for s in range(0, h.shape[0], chunk):
                h_c, t_c, v_c = hc[s : s + chunk], safe_targets[s : s + chunk, None], valid[s : s + chunk]
                scale = (v_c / n_valid)[:, None]  # d loss / d logits = (softmax - onehot) * valid / n_valid
                logits = (_gemm_xwt(h_c, wc) if fast else h_c @ wc.t()).float()
                if compiling:
                    chunk_loss, dlogits = _compiled_chunk(logits, t_c, v_c, scale, need_grad, dtype)
                else:
                    target_logit = logits.gather(1, t_c).squeeze(1)
                    # Softmax in place (max, exp, sum): the chunk is read and written while still in cache.
                    row_max = logits.amax(dim=1, keepdim=True)
                    probs = logits.sub_(row_max).exp_()
                    sum_exp = probs.sum(dim=1, keepdim=True)
                    chunk_loss = ((row_max + sum_exp.log()).squeeze(1) - target_logit) * v_c
                    if need_grad:
                        dlogits = probs.mul_(scale / sum_exp).scatter_add_(1, t_c, -scale).to(dtype)
                loss += chunk_loss.sum()
                if need_grad:
                    grad_h[s : s + chunk] = _gemm_xwt(dlogits, wc.t()) if fast else dlogits @ wc
                    grad_w.addmm_(dlogits.t(), h_c) if fast else grad_w.add_(dlogits.t() @ h_c)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, (grad_w * grad_loss).to(ctx.w_dtype), None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_elems: int = 1 << 22
) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` [N, V] against targets [N], IGNORE_INDEX skipped (0 when none
    is left). Rows go `chunk_elems // V` at a time: 4M logits (16 MiB float32) measured fastest here."""
    chunk = max(1, chunk_elems // weight.shape[0])
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, need_grad)


class Decoder(nn.Module):
    """Token ids -> logits, or -> mean next-token loss when targets are given (see `forward`)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Not persistent: derived from the config, so they stay out of state_dict().
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_buffer("causal_bias", torch.empty(0), persistent=False)
        self.init_weights()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 style init: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        device = self.tok_emb.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        n = min(cfg.seq_len, BLOCKED_ATTENTION_MAX_LEN)
        self.causal_bias = torch.full((n, n), float("-inf"), device=device).triu(1)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = residual_std if name.endswith(("attn.proj", "mlp.down")) else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def new_kv_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        cfg = self.config
        max_len = cfg.seq_len if max_len is None else min(max_len, cfg.seq_len)
        weight = self.tok_emb.weight
        return KVCache(
            cfg.n_layers,
            batch_size,
            cfg.kv_heads,
            max_len,
            cfg.head_dim,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for idx [B, T]; with targets [B, T] the mean cross-entropy instead.

        attention_mask: boolean [B, T, T] or [B, 1, T, T], True where query i may attend to key j; it
        replaces the causal mask (prefix LM). Not combined with a KV cache.
        """
        B, T = idx.shape
        if attention_mask is not None:
            if kv_cache is not None:
                raise ValueError("attention_mask and kv_cache cannot be combined")
            attention_mask = check_attention_mask(attention_mask, B, T)
        if start_pos + T > self.config.seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} exceed seq_len {self.config.seq_len}"
            )
        positions = slice(start_pos, start_pos + T)  # RoPE angles [T, 1, head_dim / 2], float32 always
        cos, sin = self.rope_cos[positions, None].float(), self.rope_sin[positions, None].float()
        attn_bias = None
        if (
            torch.compiler.is_compiling()
            and idx.device.type == "cpu"
            and kv_cache is None
            and attention_mask is None
            and T <= self.causal_bias.shape[0]
            and not (self.training and self.config.dropout)
        ):
            attn_bias = self.causal_bias[:T, :T]
        x = self.tok_emb(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_bias, kv_cache, start_pos, attention_mask)
        x = self.norm(x)
        if targets is None:
            return F.linear(x, self.head_weight)
        return linear_cross_entropy(x.view(B * T, -1), self.head_weight, targets.reshape(B * T))

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 per matmul weight (the embedding lookup is free, the LM head is not)
        plus attention scores and values, 12 * layers * d_model * seq_len (as nanoGPT's estimate_mfu)."""
        cfg = self.config
        seq_len = cfg.seq_len if seq_len is None else seq_len
        matmul_params = self.num_params(exclude_embedding=True) + self.head_weight.numel() * (
            self.lm_head is None
        )
        return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
