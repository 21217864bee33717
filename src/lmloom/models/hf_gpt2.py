"""Conversion between our `GPT` and Hugging Face GPT-2: config, state dict, and local directories.

Hugging Face GPT-2 stores its projections as `Conv1D`: weight [in, out], so y = x @ W + b, the transpose
of `nn.Linear`'s [out, in]. And `c_attn` is q, k and v fused along the output dim, in that order. So on
export each Linear weight is transposed and q/k/v concatenated; on import `c_attn` is split in three.

Two key layouts are read: `GPT2LMHeadModel` ("transformer."-prefixed body, what `save_pretrained` writes)
and `GPT2Model` (bare body, as in OpenAI's original hub upload); `GPT2LMHeadModel` is written. The tied LM
head is left out on export (as HF saves it) and checked to be the embedding on import. Old checkpoints
carry the causal-mask buffers "attn.bias" / "attn.masked_bias", which hold no weights and are dropped.
Directories are read and written with safetensors only (never pickle); `transformers` is imported only by
`to_hf_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from lmloom.models.gpt import GPT, GPTConfig
from lmloom.models.hf_dir import HF_CONFIG, HF_WEIGHTS, read_hf_dir, write_hf_dir

Layout = Literal["lm", "base"]

_LM_PREFIX = "transformer."
_LM_HEAD = "lm_head.weight"
_LAYER = "h.{}."
# One-to-one per-layer tensors, ours -> HF; the "Linear" ones are transposed (Conv1D). c_attn is separate.
_NORMS = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
_LINEARS = {"attn.proj": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
_QKV = ("attn.q", "attn.k", "attn.v")
_C_ATTN = "attn.c_attn"
_EMBEDDINGS = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight"}
_FINAL_NORM = {"norm": "ln_f"}
_LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")
_GPT2_VOCAB, _GPT2_ENDOFTEXT = 50257, 50256
# HF activation names: ours -> theirs ("gelu_new" is GPT-2's own name for the tanh GELU), and every HF
# name we can compute.
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _param_kinds(cfg: GPTConfig) -> tuple[str, ...]:
    return ("weight", "bias") if cfg.bias else ("weight",)


def hf_config_dict(cfg: GPTConfig, **extra: Any) -> dict[str, Any]:
    """The `config.json` fields of the equivalent `GPT2Config`; `extra` adds or overrides fields."""
    if not cfg.bias:
        raise ValueError("Hugging Face GPT-2 always has biases; a bias-free GPT cannot be exported")
    if cfg.activation not in _ACT_TO_HF:
        raise ValueError(f"activation {cfg.activation!r} has no GPT-2 equivalent")
    fields = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_hidden,  # None = 4 * n_embd in both
        "activation_function": _ACT_TO_HF[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attn_dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        # GPT2Config defaults both to 50256, GPT-2's <|endoftext|>: right for its 50257-token BPE only;
        # any other vocabulary gets None (transformers warns about ids outside it). `extra` sets real ones.
        "bos_token_id": _GPT2_ENDOFTEXT if cfg.vocab_size == _GPT2_VOCAB else None,
        "eos_token_id": _GPT2_ENDOFTEXT if cfg.vocab_size == _GPT2_VOCAB else None,
    }
    return fields | extra


def to_hf_config(cfg: GPTConfig, **extra: Any):
    """A `transformers.GPT2Config` for `cfg` (needs the optional `transformers` dependency)."""
    from transformers import GPT2Config

    fields = hf_config_dict(cfg, **extra)
    fields.pop("model_type")
    return GPT2Config(**fields)


def from_hf_config(hf: Any) -> GPTConfig:
    """Our config from a `GPT2Config` or its `config.json` dict; refuses features we do not implement.

    Dropout: ours has one rate for embeddings and residual branches; HF's `resid_pdrop` is taken.
    """
    c = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    problems = []
    if c.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={c['model_type']!r} (only 'gpt2')")
    act = c.get("activation_function", "gelu_new")
    if act not in _ACT_FROM_HF:
        problems.append(f"activation_function={act!r} (implemented: {sorted(_ACT_FROM_HF)})")
    if c.get("scale_attn_weights", True) is False:
        problems.append("scale_attn_weights=False (we always scale by 1/sqrt(head_dim))")
    if c.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if c.get("add_cross_attention"):
        problems.append("add_cross_attention=True (decoder-only)")
    if c["n_embd"] % c["n_head"]:
        problems.append(f"n_embd={c['n_embd']} not divisible by {c['n_head']} heads")
    if problems:
        raise ValueError("cannot convert this GPT-2 config: " + "; ".join(problems))
    return GPTConfig(
        vocab_size=c["vocab_size"],
        seq_len=c["n_positions"],
        d_model=c["n_embd"],
        n_layers=c["n_layer"],
        n_heads=c["n_head"],
        ffn_hidden=c.get("n_inner"),
        activation=_ACT_FROM_HF[act],
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        bias=True,
        dropout=c.get("resid_pdrop", 0.1),
        attn_dropout=c.get("attn_pdrop", 0.1),
        tie_embeddings=c.get("tie_word_embeddings", True),
        init_std=c.get("initializer_range", 0.02),
    )


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], cfg: GPTConfig, layout: Layout = "lm"
) -> dict[str, torch.Tensor]:
    """Our `GPT.state_dict()` with HF keys: layout "lm" = `GPT2LMHeadModel` (an untied head included as
    "lm_head.weight"), "base" = `GPT2Model` (no head). Tensors are contiguous, ready for safetensors."""
    if not cfg.bias:
        raise ValueError("Hugging Face GPT-2 always has biases; a bias-free GPT cannot be exported")
    prefix = _LM_PREFIX if layout == "lm" else ""
    out = {prefix + theirs: state[ours] for ours, theirs in _EMBEDDINGS.items()}
    for ours, theirs in _FINAL_NORM.items():
        for kind in ("weight", "bias"):
            out[f"{prefix}{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for i in range(cfg.n_layers):
        ours_at, theirs_at = f"layers.{i}.", prefix + _LAYER.format(i)
        for ours, theirs in _NORMS.items():
            for kind in ("weight", "bias"):
                out[f"{theirs_at}{theirs}.{kind}"] = state[f"{ours_at}{ours}.{kind}"]
        for ours, theirs in _LINEARS.items():
            out[f"{theirs_at}{theirs}.weight"] = state[f"{ours_at}{ours}.weight"].T
            out[f"{theirs_at}{theirs}.bias"] = state[f"{ours_at}{ours}.bias"]
        # Linear [out, in] rows q | k | v -> Conv1D [in, 3 * out] columns q | k | v.
        out[f"{theirs_at}{_C_ATTN}.weight"] = torch.cat([state[f"{ours_at}{n}.weight"] for n in _QKV]).T
        out[f"{theirs_at}{_C_ATTN}.bias"] = torch.cat([state[f"{ours_at}{n}.bias"] for n in _QKV])
    if layout == "lm" and not cfg.tie_embeddings:
        out[_LM_HEAD] = state[_LM_HEAD]
    return {k: v.contiguous() for k, v in out.items()}


def detect_layout(hf_state: Mapping[str, torch.Tensor]) -> Layout:
    """ "lm" when the body keys carry GPT2LMHeadModel's "transformer." prefix, else "base"."""
    return "lm" if any(k.startswith(_LM_PREFIX) for k in hf_state) else "base"


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 weights (either layout, see `detect_layout`) as our `GPT` keys. Missing or unknown keys
    are an error, except the legacy attention buffers (see the module doc)."""
    prefix = _LM_PREFIX if detect_layout(hf_state) == "lm" else ""
    state = {k: v for k, v in hf_state.items() if not k.endswith(_LEGACY_BUFFERS)}

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"GPT-2 state dict is missing {key!r}")
        return state.pop(key)

    out = {ours: take(prefix + theirs) for ours, theirs in _EMBEDDINGS.items()}
    for ours, theirs in _FINAL_NORM.items():
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = take(f"{prefix}{theirs}.{kind}")
    for i in range(cfg.n_layers):
        ours_at, theirs_at = f"layers.{i}.", prefix + _LAYER.format(i)
        for ours, theirs in _NORMS.items():
            for kind in ("weight", "bias"):
                out[f"{ours_at}{ours}.{kind}"] = take(f"{theirs_at}{theirs}.{kind}")
        for ours, theirs in _LINEARS.items():
            out[f"{ours_at}{ours}.weight"] = take(f"{theirs_at}{theirs}.weight").T.contiguous()
            out[f"{ours_at}{ours}.bias"] = take(f"{theirs_at}{theirs}.bias")
        qkv_weight = take(f"{theirs_at}{_C_ATTN}.weight").T  # [3 * d_model, d_model]
        qkv_bias = take(f"{theirs_at}{_C_ATTN}.bias")
        for name, weight, bias in zip(_QKV, qkv_weight.chunk(3), qkv_bias.chunk(3), strict=True):
            out[f"{ours_at}{name}.weight"] = weight.contiguous()
            out[f"{ours_at}{name}.bias"] = bias.contiguous()
    head = state.pop(_LM_HEAD, None)
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, out["tok_emb.weight"]):
            raise ValueError("lm_head.weight differs from the token embedding but the config ties them")
    elif head is None:
        raise ValueError("the config unties the LM head but the state dict has no lm_head.weight")
    else:
        out[_LM_HEAD] = head
    if state:
        raise ValueError(f"GPT-2 state dict has keys the model does not use: {sorted(state)[:8]}")
    return out


def import_hf_dir(path: str | Path) -> tuple[GPT, GPTConfig]:
    """A `GPT` (eval mode) from a local HF GPT-2 directory: config.json + model.safetensors.

    Sharded checkpoints are not read.
    """
    hf_config, hf_state = read_hf_dir(path)
    cfg = from_hf_config(hf_config)
    model = GPT(cfg)
    model.load_state_dict(from_hf_state_dict(hf_state, cfg))
    return model.eval(), cfg


def export_hf_dir(model: GPT, path: str | Path, **extra: Any) -> None:
    """Write config.json + model.safetensors that `transformers.GPT2LMHeadModel.from_pretrained(path)`
    loads; `extra` adds or overrides config fields (e.g. bos_token_id / eos_token_id)."""
    cfg = model.config
    fields = hf_config_dict(cfg, **extra)  # first: refuses what GPT-2 cannot hold before writing anything
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_hf_dir(path, fields, to_hf_state_dict(state, cfg, "lm"))


__all__ = [
    "HF_CONFIG",
    "HF_WEIGHTS",
    "Layout",
    "detect_layout",
    "export_hf_dir",
    "from_hf_config",
    "from_hf_state_dict",
    "hf_config_dict",
    "import_hf_dir",
    "to_hf_config",
    "to_hf_state_dict",
]
