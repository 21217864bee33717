"""Conversion between our `Decoder` and Hugging Face `LlamaForCausalLM`: config and state dict, both ways.

Our block is Llama's block with q/k/v fused: `attn.qkv` is q_proj, k_proj and v_proj stacked along the
output dimension. Our RoPE rotates adjacent pairs of dims (2i, 2i+1), as Meta's original Llama; HF's
rotates (i, i + head_dim/2), so the rows of q_proj and k_proj are permuted within each head on the way
(the attention scores are unchanged: q and k get the same permutation). The other weights map one to one.
`import_hf_dir` / `export_hf_dir` read and write a local HF directory (config.json + model.safetensors,
through `hf_dir.py`); the rest handles tensors and plain dicts only. `transformers` is imported only by
`to_hf_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.hf_dir import read_hf_dir, write_hf_dir

_LAYER = "model.layers.{}."
# Per-layer tensors that map one-to-one: ours -> Hugging Face.
_SAME = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def _pairs_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows of each head from RoPE pairs (2i, 2i+1) to HF's (i, i + D/2)."""
    return w.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2).contiguous()


def _halves_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `_pairs_to_halves`."""
    return w.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2).contiguous()


def hf_config_dict(cfg: DecoderConfig, **extra: Any) -> dict[str, Any]:
    """The `config.json` fields of the equivalent `LlamaConfig`; `extra` adds e.g. token ids."""
    if cfg.parallel:
        raise ValueError("a parallel (PaLM-style) block has no Llama equivalent; export needs parallel=False")
    fields = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # HF Llama only has attention-probability dropout; ours also drops on the residual branches.
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # Token ids belong to the tokenizer; without them HF's generate() never stops early by surprise.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    return fields | extra


def to_hf_config(cfg: DecoderConfig, **extra: Any):
    """A `transformers.LlamaConfig` for `cfg` (needs the optional `transformers` dependency)."""
    from transformers import LlamaConfig

    fields = hf_config_dict(cfg, **extra)
    fields.pop("model_type")
    return LlamaConfig(**fields)


def from_hf_config(hf: Any) -> DecoderConfig:
    """Our config from a `LlamaConfig` or its `config.json` dict; refuses features we do not implement."""
    c = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if rope_type != "default":
        problems.append(f"rope_type={rope_type!r} (only 'default' RoPE is implemented)")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c['hidden_act']!r} (only 'silu' is implemented)")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            problems.append(f"{flag}=True (the decoder has no biases)")
    n_heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_heads
    if head_dim * n_heads != c["hidden_size"]:
        problems.append(f"head_dim={head_dim} with hidden_size={c['hidden_size']} and {n_heads} heads")
    if problems:
        raise ValueError("cannot convert this Llama config: " + "; ".join(problems))
    return DecoderConfig(
        vocab_size=c["vocab_size"],
        seq_len=c["max_position_embeddings"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        ffn_hidden=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        dropout=c.get("attention_dropout", 0.0) or 0.0,
        tie_embeddings=c.get("tie_word_embeddings", False),
        init_std=c.get("initializer_range", 0.02),
    )


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Our `Decoder.state_dict()` as `LlamaForCausalLM` keys. A tied head is left out, as HF saves it."""
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", _LAYER.format(i)
        for src, dst in _SAME.items():
            out[theirs + dst] = state[ours + src]
        q, k, v = state[ours + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        out[theirs + _QKV[0]] = _pairs_to_halves(q, cfg.n_heads)
        out[theirs + _QKV[1]] = _pairs_to_halves(k, cfg.kv_heads)
        out[theirs + _QKV[2]] = v.contiguous()
    return out


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` weights as our `Decoder` keys; unknown or missing keys are an error."""
    state = dict(hf_state)
    # Non-persistent buffers written by old transformers versions, and HF's copy of a tied head.
    for key in [k for k in state if k.endswith("rotary_emb.inv_freq")]:
        del state[key]
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    out = {}

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"Llama state dict is missing {key!r}")
        return state.pop(key)

    out["tok_emb.weight"] = take("model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", _LAYER.format(i)
        for dst, src in _SAME.items():
            out[ours + dst] = take(theirs + src)
        q, k, v = (take(theirs + name) for name in _QKV)
        q, k = _halves_to_pairs(q, cfg.n_heads), _halves_to_pairs(k, cfg.kv_heads)
        out[ours + "attn.qkv.weight"] = torch.cat([q, k, v], dim=0)
    out["norm.weight"] = take("model.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    if state:
        raise ValueError(f"Llama state dict has keys the decoder does not use: {sorted(state)[:8]}")
    return out


def import_hf_dir(path: str | Path) -> tuple[Decoder, DecoderConfig]:
    """A `Decoder` (eval mode) from a local HF Llama directory: config.json + model.safetensors.

    Sharded checkpoints are not read.
    """
    hf_config, hf_state = read_hf_dir(path)
    cfg = from_hf_config(hf_config)
    model = Decoder(cfg)
    model.load_state_dict(from_hf_state_dict(hf_state, cfg))
    return model.eval(), cfg


def export_hf_dir(model: Decoder, path: str | Path, **extra: Any) -> None:
    """Write config.json + model.safetensors that `transformers.LlamaForCausalLM.from_pretrained(path)`
    loads; `extra` adds or overrides config fields (e.g. bos_token_id / eos_token_id)."""
    cfg = model.config
    fields = hf_config_dict(cfg, **extra)  # first: refuses a parallel block before writing anything
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_hf_dir(path, fields, to_hf_state_dict(state, cfg))
