"""Conversion between our `Encoder` and Hugging Face BERT: config, state dict, and local directories.

Every weight maps one to one (names only). Two Hugging Face key layouts are read and written:
`BertForMaskedLM` ("bert."-prefixed body, "cls.predictions." MLM head) and `BertModel` (bare body, with
the pooler). The MLM decoder weight is the word embedding in both models, so it is left out on export (as
HF saves it) and checked to be the embedding on import; HF's `cls.predictions.decoder.bias` is an alias
of `cls.predictions.bias`. An encoder without token-type embeddings exports as type_vocab_size 1 with a
zero row, which adds nothing. Directories are read and written with safetensors only (never pickle);
`transformers` is imported only by `to_hf_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from lmloom.models.encoder import Encoder, EncoderConfig
from lmloom.models.hf_dir import read_hf_dir, write_hf_dir

Layout = Literal["mlm", "base"]

_MLM_PREFIX = "bert."
_LAYER = "encoder.layer.{}."
# Per-layer tensors, ours -> Hugging Face (both .weight and .bias).
_LAYER_MAP = {
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.proj": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp.up": "intermediate.dense",
    "mlp.down": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
_EMBEDDINGS = {
    "tok_emb.weight": "embeddings.word_embeddings.weight",
    "pos_emb.weight": "embeddings.position_embeddings.weight",
    "emb_norm.weight": "embeddings.LayerNorm.weight",
    "emb_norm.bias": "embeddings.LayerNorm.bias",
}
_TYPE_EMB = ("type_emb.weight", "embeddings.token_type_embeddings.weight")
_POOLER = {"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"}
_MLM_HEAD = {
    "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_head.bias": "cls.predictions.bias",
}
_DECODER_WEIGHT, _DECODER_BIAS = "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"
# HF activation names: ours -> theirs, and every HF name we can compute.
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_ACT_FROM_HF = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}


def _body_map(cfg: EncoderConfig) -> dict[str, str]:
    """Our body keys -> HF `BertModel` keys (no prefix)."""
    names = dict(_EMBEDDINGS)
    if cfg.type_vocab_size:
        names[_TYPE_EMB[0]] = _TYPE_EMB[1]
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = _LAYER.format(i) + f"{theirs}.{kind}"
    if cfg.pooler:
        names |= _POOLER
    return names


def hf_config_dict(cfg: EncoderConfig, **extra: Any) -> dict[str, Any]:
    """The `config.json` fields of the equivalent `BertConfig`; `extra` adds or overrides fields."""
    fields = {
        "architectures": ["BertForMaskedLM" if cfg.mlm_head else "BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.hidden_dim,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout,
        "max_position_embeddings": cfg.max_positions,
        # HF always adds a token-type embedding: without ours it gets one zero row (see the module doc).
        "type_vocab_size": max(cfg.type_vocab_size, 1),
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }
    return fields | extra


def to_hf_config(cfg: EncoderConfig, **extra: Any):
    """A `transformers.BertConfig` for `cfg` (needs the optional `transformers` dependency)."""
    from transformers import BertConfig

    fields = hf_config_dict(cfg, **extra)
    fields.pop("model_type")
    return BertConfig(**fields)


def from_hf_config(hf: Any, *, pooler: bool = True, mlm_head: bool = True) -> EncoderConfig:
    """Our config from a `BertConfig` or its `config.json` dict; refuses features we do not implement.

    Whether the checkpoint has a pooler and an MLM head is a property of its weights, not of the config:
    `import_hf_dir` reads it from the keys.
    """
    c = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    problems = []
    if c.get("model_type", "bert") != "bert":
        problems.append(f"model_type={c['model_type']!r} (only 'bert')")
    act = c.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        problems.append(f"hidden_act={act!r} (implemented: {sorted(_ACT_FROM_HF)})")
    if c.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={c['position_embedding_type']!r} (only 'absolute')")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        problems.append("a BERT decoder / cross-attention (the encoder is bidirectional only)")
    if c.get("tie_word_embeddings") is False and mlm_head:
        problems.append("tie_word_embeddings=False (our MLM decoder is always the word embedding)")
    if c["hidden_size"] % c["num_attention_heads"]:
        problems.append(f"hidden_size={c['hidden_size']} not divisible by {c['num_attention_heads']} heads")
    if problems:
        raise ValueError("cannot convert this BERT config: " + "; ".join(problems))
    return EncoderConfig(
        vocab_size=c["vocab_size"],
        max_positions=c["max_position_embeddings"],
        type_vocab_size=c.get("type_vocab_size", 2),
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        ffn_hidden=c["intermediate_size"],
        activation=_ACT_FROM_HF[act],
        norm_eps=c.get("layer_norm_eps", 1e-12),
        dropout=c.get("hidden_dropout_prob", 0.1),
        attn_dropout=c.get("attention_probs_dropout_prob", 0.1),
        pooler=pooler,
        mlm_head=mlm_head,
        pad_token_id=c.get("pad_token_id"),
        init_std=c.get("initializer_range", 0.02),
    )


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], cfg: EncoderConfig, layout: Layout = "mlm"
) -> dict[str, torch.Tensor]:
    """Our `Encoder.state_dict()` with HF keys: `layout` "mlm" = `BertForMaskedLM` (needs the MLM head; a
    pooler goes under "bert.pooler.", which `BertModel.from_pretrained` reads and BertForMaskedLM ignores),
    "base" = `BertModel` (the MLM head, if any, is left out). The tied decoder weight is left out."""
    if layout == "mlm" and not cfg.mlm_head:
        raise ValueError("the 'mlm' layout needs an encoder with an MLM head")
    prefix = _MLM_PREFIX if layout == "mlm" else ""
    out = {prefix + theirs: state[ours] for ours, theirs in _body_map(cfg).items()}
    if not cfg.type_vocab_size:
        out[prefix + _TYPE_EMB[1]] = torch.zeros(1, cfg.d_model, dtype=state["tok_emb.weight"].dtype)
    if layout == "mlm":
        out |= {theirs: state[ours] for ours, theirs in _MLM_HEAD.items()}
    return out


def detect_layout(hf_state: Mapping[str, torch.Tensor]) -> Layout:
    """ "mlm" when the body keys carry BertForMaskedLM's "bert." prefix, else "base"."""
    return "mlm" if any(k.startswith(_MLM_PREFIX) for k in hf_state) else "base"


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """HF BERT weights (either layout, see `detect_layout`) as our `Encoder` keys.

    Missing or unknown keys are an error, with two exceptions that carry nothing we compute: the old
    `position_ids` buffer and BertForPreTraining's next-sentence head ("cls.seq_relationship.").
    """
    prefix = _MLM_PREFIX if detect_layout(hf_state) == "mlm" else ""
    state = dict(hf_state)
    for key in [
        k for k in state if k.endswith("embeddings.position_ids") or k.startswith("cls.seq_relationship.")
    ]:
        del state[key]

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"BERT state dict is missing {key!r}")
        return state.pop(key)

    out = {ours: take(prefix + theirs) for ours, theirs in _body_map(cfg).items()}
    if not cfg.type_vocab_size:
        types = state.pop(prefix + _TYPE_EMB[1], None)
        if types is not None and types.any():
            raise ValueError("the checkpoint has non-zero token-type embeddings but the config has none")
    if cfg.mlm_head:
        out |= {ours: take(theirs) for ours, theirs in _MLM_HEAD.items()}
        decoder_bias = state.pop(_DECODER_BIAS, None)
        if decoder_bias is not None and not torch.equal(decoder_bias, out["mlm_head.bias"]):
            raise ValueError(f"{_DECODER_BIAS} differs from cls.predictions.bias (they are one tensor in HF)")
        decoder = state.pop(_DECODER_WEIGHT, None)
        if decoder is not None and not torch.equal(decoder, out["tok_emb.weight"]):
            raise ValueError(
                "the MLM decoder is not tied to the word embeddings; the encoder cannot hold that"
            )
    if state:
        raise ValueError(f"BERT state dict has keys the encoder does not use: {sorted(state)[:8]}")
    return out


def import_hf_dir(path: str | Path) -> tuple[Encoder, EncoderConfig]:
    """An `Encoder` (eval mode) from a local HF BERT directory: config.json + model.safetensors.

    Pooler and MLM head are built when the checkpoint has their weights. Sharded checkpoints are not read.
    """
    hf_config, hf_state = read_hf_dir(path)
    prefix = _MLM_PREFIX if detect_layout(hf_state) == "mlm" else ""
    cfg = from_hf_config(
        hf_config,
        pooler=prefix + "pooler.dense.weight" in hf_state,
        mlm_head="cls.predictions.bias" in hf_state,
    )
    model = Encoder(cfg)
    model.load_state_dict(from_hf_state_dict(hf_state, cfg))
    return model.eval(), cfg


def export_hf_dir(model: Encoder, path: str | Path, layout: Layout | None = None, **extra: Any) -> None:
    """Write config.json + model.safetensors that `transformers.BertForMaskedLM.from_pretrained(path)`
    (layout "mlm", the default when the model has an MLM head) or `BertModel.from_pretrained` loads."""
    cfg = model.config
    layout = layout or ("mlm" if cfg.mlm_head else "base")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    architecture = "BertForMaskedLM" if layout == "mlm" else "BertModel"
    fields = hf_config_dict(cfg, architectures=[architecture], **extra)
    write_hf_dir(path, fields, to_hf_state_dict(state, cfg, layout))
