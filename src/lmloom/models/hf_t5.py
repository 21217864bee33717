"""Conversion between our `T5` and Hugging Face `T5ForConditionalGeneration`: config, state dict, local
directories.

Every weight maps one to one (names only). HF nests each sublayer as `block.{i}.layer.{j}`: in the encoder
j = 0 is self-attention and 1 the feed-forward; in the decoder 0 self-attention, 1 cross-attention
("EncDecAttention") and 2 the feed-forward. The relative position table lives in block 0's self-attention.
Gated feed-forwards are `wi_0` (the GELU gate), `wi_1` (linear) and `wo`; ReLU ones `wi` and `wo`.

Tying: transformers 5 always ties `encoder.embed_tokens` / `decoder.embed_tokens` / `lm_head` to `shared`
unless the checkpoint holds a different `lm_head.weight`, and it decides whether to rescale the decoder
output by `scale_decoder_outputs` (derived from `tie_word_embeddings` when absent). We write
`tie_word_embeddings` (which transformers 4 reads) and `scale_decoder_outputs` both, and `lm_head.weight`
only when untied. On import, a T5 1.0 checkpoint (rescaled) must have its head tied; a v1.1 one (not
rescaled) gets its own head, copied from `shared` if the file leaves it out.

Directories are read and written with safetensors only (never pickle); `transformers` is imported only by
`to_hf_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmloom.models.encoder_decoder import T5, T5Config
from lmloom.models.hf_dir import read_hf_dir, write_hf_dir

_SHARED, _LM_HEAD = "shared.weight", "lm_head.weight"
# Copies of `shared` that older checkpoints stored, and a cross-attention table HF never used.
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_ATTENTION = {"q": "q", "k": "k", "v": "v", "proj": "o"}
_FEED_FORWARD = {
    "relu": {"up": "wi", "down": "wo"},
    "gated-gelu": {"gate": "wi_0", "up": "wi_1", "down": "wo"},
}
# HF feed_forward_proj values we compute. "gated-gelu" means the tanh GELU ("gelu_new") in HF too.
_FEED_FORWARD_FROM_HF = {"relu": "relu", "gated-gelu": "gated-gelu", "gated-gelu_new": "gated-gelu"}


def _stack_map(cfg: T5Config, stack: str) -> dict[str, str]:
    """Our keys -> HF keys for the "encoder" or "decoder" stack."""
    n_layers = cfg.n_layers if stack == "encoder" else cfg.decoder_layers
    ff_index = 1 if stack == "encoder" else 2
    names = {
        f"{stack}.relative_bias.table.weight": f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        f"{stack}.final_norm.weight": f"{stack}.final_layer_norm.weight",
    }
    for i in range(n_layers):
        ours, theirs = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
        sublayers = [("attn", "0.SelfAttention")]
        if stack == "decoder":
            sublayers.append(("cross_attn", "1.EncDecAttention"))
        for our_attn, their_attn in sublayers:
            for a, b in _ATTENTION.items():
                names[f"{ours}{our_attn}.{a}.weight"] = f"{theirs}{their_attn}.{b}.weight"
        names[f"{ours}attn_norm.weight"] = f"{theirs}0.layer_norm.weight"
        if stack == "decoder":
            names[f"{ours}cross_attn_norm.weight"] = f"{theirs}1.layer_norm.weight"
        for a, b in _FEED_FORWARD[cfg.feed_forward].items():
            names[f"{ours}mlp.{a}.weight"] = f"{theirs}{ff_index}.DenseReluDense.{b}.weight"
        names[f"{ours}mlp_norm.weight"] = f"{theirs}{ff_index}.layer_norm.weight"
    return names


def key_map(cfg: T5Config) -> dict[str, str]:
    """Our `T5.state_dict()` keys -> `T5ForConditionalGeneration` keys (the LM head included when untied)."""
    names = {_SHARED: _SHARED} | _stack_map(cfg, "encoder") | _stack_map(cfg, "decoder")
    if not cfg.tie_word_embeddings:
        names[_LM_HEAD] = _LM_HEAD
    return names


def hf_config_dict(cfg: T5Config, **extra: Any) -> dict[str, Any]:
    """The `config.json` fields of the equivalent HF `T5Config`; `extra` adds or overrides fields."""
    fields = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_factor": cfg.init_factor,
        "feed_forward_proj": cfg.feed_forward,
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.tie_word_embeddings,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "pad_token_id": cfg.pad_id,
    }
    return fields | extra


def to_hf_config(cfg: T5Config, **extra: Any):
    """A `transformers.T5Config` for `cfg` (needs the optional `transformers` dependency)."""
    from transformers import T5Config as HFT5Config

    fields = hf_config_dict(cfg, **extra)
    for key in ("model_type", "scale_decoder_outputs"):
        # model_type is the class's; the rescale follows from tie_word_embeddings in the constructor.
        fields.pop(key)
    return HFT5Config(**fields)


def from_hf_config(hf: Any) -> T5Config:
    """Our config from an HF `T5Config` or its `config.json` dict; refuses features we do not implement.

    tie_word_embeddings here means "rescale the decoder output and tie the head" (T5 1.0): it is read from
    `scale_decoder_outputs` when present (transformers 5 forces `tie_word_embeddings` to True in memory).
    """
    c = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    problems = []
    if c.get("model_type", "t5") != "t5":
        problems.append(f"model_type={c['model_type']!r} (only 't5')")
    feed_forward = c.get("feed_forward_proj", "relu")
    if feed_forward not in _FEED_FORWARD_FROM_HF:
        problems.append(f"feed_forward_proj={feed_forward!r} (implemented: {sorted(_FEED_FORWARD_FROM_HF)})")
    if c.get("is_encoder_decoder") is False:
        problems.append("is_encoder_decoder=False (an encoder-only or decoder-only T5)")
    if problems:
        raise ValueError("cannot convert this T5 config: " + "; ".join(problems))
    rescale = c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True) is not False)
    pad_id = c.get("pad_token_id", 0)
    start = c.get("decoder_start_token_id")
    return T5Config(
        vocab_size=c["vocab_size"],
        d_model=c["d_model"],
        d_kv=c["d_kv"],
        d_ff=c["d_ff"],
        n_layers=c["num_layers"],
        n_decoder_layers=c.get("num_decoder_layers") or c["num_layers"],
        n_heads=c["num_heads"],
        relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
        feed_forward=_FEED_FORWARD_FROM_HF[feed_forward],
        layer_norm_eps=c.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=bool(rescale),
        dropout=c.get("dropout_rate", 0.1),
        # T5 starts decoding from its pad token; HF configs of the original checkpoints say so explicitly.
        decoder_start_token_id=pad_id if start is None else start,
        pad_id=pad_id,
        init_factor=c.get("initializer_factor", 1.0),
    )


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """Our `T5.state_dict()` with `T5ForConditionalGeneration` keys; tied copies of `shared` left out."""
    return {theirs: state[ours] for ours, theirs in key_map(cfg).items()}


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """HF T5 weights as our `T5` keys. Missing or unknown keys are an error; copies of `shared` must equal it."""
    state = dict(hf_state)
    for key in _UNUSED:
        state.pop(key, None)

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"T5 state dict is missing {key!r}")
        return state.pop(key)

    shared = take(_SHARED)
    for alias in _ALIASES:
        copy = state.pop(alias, None)
        if copy is not None and not torch.equal(copy, shared):
            raise ValueError(f"{alias} differs from {_SHARED}; our T5 has one token embedding")
    head = state.pop(_LM_HEAD, None)
    out = {_SHARED: shared}
    if cfg.tie_word_embeddings:
        if head is not None and not torch.equal(head, shared):
            raise ValueError(
                "the config rescales the decoder output (T5 1.0, tied head) but lm_head.weight differs from "
                "shared.weight; our T5 ties the head whenever it rescales"
            )
    else:
        # Left out = tied in HF; our untied model holds the same values in its own parameter.
        out[_LM_HEAD] = shared.clone() if head is None else head
    for ours, theirs in key_map(cfg).items():
        if ours not in out:
            out[ours] = take(theirs)
    if state:
        raise ValueError(f"T5 state dict has keys the model does not use: {sorted(state)[:8]}")
    return out


def import_hf_dir(path: str | Path) -> tuple[T5, T5Config]:
    """A `T5` (eval mode) from a local HF T5 directory: config.json + model.safetensors (not sharded)."""
    hf_config, hf_state = read_hf_dir(path)
    cfg = from_hf_config(hf_config)
    model = T5(cfg)
    model.load_state_dict(from_hf_state_dict(hf_state, cfg))
    return model.eval(), cfg


def export_hf_dir(model: T5, path: str | Path, **extra: Any) -> None:
    """Write config.json + model.safetensors that `transformers.T5ForConditionalGeneration.from_pretrained`
    loads; `extra` adds config fields (eos_token_id, task_specific_params, ...)."""
    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_hf_dir(path, hf_config_dict(cfg, **extra), to_hf_state_dict(state, cfg))


__all__ = [
    "export_hf_dir",
    "from_hf_config",
    "from_hf_state_dict",
    "hf_config_dict",
    "import_hf_dir",
    "key_map",
    "to_hf_config",
    "to_hf_state_dict",
]
