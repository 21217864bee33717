"""`export.gguf`: checkpoint -> one GGUF file (llama architecture) for llama.cpp and its kin.

Tensors are named as llama.cpp's loader expects (`token_embd.weight`, `blk.N.attn_q.weight`, ...).
RoPE layout: llama.cpp's `convert_hf_to_gguf.py` (LlamaModel.permute) reorders the q/k rows of a
Hugging Face checkpoint per head with `reshape(heads, 2, D/2, ...).swapaxes(1, 2)`: from HF's
"halves" layout (dim i pairs with i + D/2) back to Meta's adjacent pairs (2i, 2i+1), which is what
llama.cpp's LLAMA rope (the "normal" mode, rotating adjacent pairs) computes on. Our decoder stores
q/k rows in that pairs layout already (`hf_llama._pairs_to_halves` is the opposite permutation), so
q and k are written exactly as our `attn.qkv` rows hold them, with no permutation.

The tokenizer: byte-level BPE (`tokenizer.json`) as llama.cpp's "gpt2" model with its GPT-2
pre-tokenizer: tokens by id (ids the model has beyond the tokenizer are `[PADn]`, UNUSED), merges,
token types (our specials CONTROL). Other tokenizer algorithms are refused (not mapped yet).
Norm weights stay float32, as llama.cpp's converter keeps 1-D tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from lmloom.artifacts.manifest import Manifest
from lmloom.config import StrictConfig
from lmloom.errors import ConfigError, LmloomError
from lmloom.export.common import copy_file_into, load_checkpoint, scratch_dir
from lmloom.models.decoder import DecoderConfig
from lmloom.stages import Stage
from lmloom.tokenizers.base import HF_TOKENIZER_FILE, SPECIAL_TOKENS

GGUF_FILE = "model.gguf"
ARCH = "llama"

# Per-layer tensors: ours -> llama.cpp's (blk.N. prefix on both sides' layer).
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.proj.weight": "attn_output.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate.weight",
    "mlp.up.weight": "ffn_up.weight",
    "mlp.down.weight": "ffn_down.weight",
}


class GgufExportConfig(StrictConfig):
    dtype: Literal["f32", "f16"] = Field("f16", description="matrix type (1-D norm weights stay f32)")
    name: str | None = Field(None, description="general.name (default: lmloom-<checkpoint id prefix>)")


def gguf_tensors(state: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's tensor names (q/k rows unpermuted: see the module docstring)."""
    if cfg.parallel:
        raise ValueError("a parallel (PaLM-style) block has no llama.cpp LLAMA equivalent")
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"token_embd.weight": state["tok_emb.weight"]}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"blk.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        out[theirs + "attn_q.weight"], out[theirs + "attn_k.weight"], out[theirs + "attn_v.weight"] = q, k, v
        for src, dst in _LAYER_NAMES.items():
            out[theirs + dst] = state[ours + src]
    out["output_norm.weight"] = state["norm.weight"]
    if not cfg.tie_embeddings:  # llama.cpp falls back to token_embd when output.weight is absent
        out["output.weight"] = state["lm_head.weight"]
    return out


def state_from_gguf(tensors: dict[str, np.ndarray], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Inverse of `gguf_tensors` (float32): our state dict from the tensors of a GGUF file."""
    state = {"tok_emb.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"]}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"blk.{i}."
        state[ours + "attn.qkv.weight"] = np.concatenate(
            [tensors[theirs + f"attn_{x}.weight"] for x in "qkv"], axis=0
        )
        for src, dst in _LAYER_NAMES.items():
            state[ours + src] = tensors[theirs + dst]
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = tensors["output.weight"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def bpe_vocab(tokenizer_json: str, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b") of a byte-level BPE tokenizer.json, padded to vocab_size."""
    import gguf

    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(
            f"GGUF export maps byte-level BPE tokenizers only; this checkpoint's is {model.get('type')!r}"
        )
    by_id = {int(i): tok for tok, i in model["vocab"].items()}
    specials = set(SPECIAL_TOKENS)
    for added in data.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        if added.get("special"):
            specials.add(added["content"])
    if max(by_id) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(by_id)}, the model only {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if by_id[i] in specials else gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_gguf(path: Path, model, tokenizer_json: str, dtype: str, name: str, ids: dict[str, int]) -> None:
    import gguf

    cfg = model.config
    tensors = gguf_tensors({k: v.detach().float() for k, v in model.state_dict().items()}, cfg)
    tokens, types, merges = bpe_vocab(tokenizer_json, cfg.vocab_size)
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # our ByteLevel pre-tokenizer splits with GPT-2's regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(False)  # training joins documents with <|eos|>; nothing is prepended
    writer.add_add_eos_token(False)
    for tensor_name, tensor in tensors.items():
        array = tensor.contiguous().numpy()
        if dtype == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata key -> value, tensor name -> array in PyTorch's [rows, cols] order) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        metadata[key] = value
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return metadata, tensors


def run(config: GgufExportConfig, inputs, ctx, out) -> None:
    checkpoint = inputs["checkpoint"]
    model, tokenizer = load_checkpoint(checkpoint)
    cfg = model.config
    if cfg.parallel:
        raise ConfigError(f"stages.{ctx.step}: a parallel (PaLM-style) block has no llama.cpp equivalent")
    if not checkpoint.has(HF_TOKENIZER_FILE):
        raise ConfigError(
            f"stages.{ctx.step}: GGUF export maps byte-level BPE tokenizer.json tokenizers only; "
            f"checkpoint {checkpoint.short_id} has a {tokenizer.algorithm} tokenizer"
        )
    name = config.name or f"lmloom-{checkpoint.short_id}"
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    with scratch_dir(ctx) as tmp:
        path = tmp / GGUF_FILE
        write_gguf(path, model, checkpoint.read_text(HF_TOKENIZER_FILE), config.dtype, name, ids)
        # Read it back before publishing: every tensor must be ours (exactly, or its float16 rounding).
        metadata, tensors = read_gguf(path)
        _check_readback(model, tensors, config.dtype)
        copy_file_into(out, GGUF_FILE, path)
        size = path.stat().st_size
    out.metadata.update(
        format="gguf",
        architecture=ARCH,
        dtype=config.dtype,
        name=name,
        file_bytes=size,
        tensors=len(tensors),
        parameters=model.num_params(),
        model=cfg.model_dump(mode="json"),
        tokenizer=checkpoint.manifest.metadata.get("tokenizer"),
        tokenizer_model="gpt2",
        checkpoint=checkpoint.id,
        rope_layout="adjacent pairs (llama.cpp normal rope); q/k rows written unpermuted",
    )
    ctx.log(f"GGUF ({config.dtype}): {len(tensors)} tensors, {size:,} bytes, read back and checked")


def _check_readback(model, tensors: dict[str, np.ndarray], dtype: str) -> None:
    cfg = model.config
    back = state_from_gguf(tensors, cfg)
    for key, ours in model.state_dict().items():
        ours = ours.detach().float()
        if dtype == "f16" and ours.dim() > 1:
            ours = ours.half().float()
        if key not in back or not torch.equal(back[key], ours):
            raise LmloomError(f"GGUF read-back: tensor {key} differs from the checkpoint's; not published")


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    return [("GGUF export", f"llama, {m['dtype']}, {m['tensors']} tensors, {m['file_bytes']:,} bytes")]


GGUF = Stage(
    name="export.gguf",
    kind="gguf-model",
    config=GgufExportConfig,
    run=run,
    inputs={"checkpoint": "checkpoint"},
    permissions=("export",),
    summary=summary,
    description="export a checkpoint as one GGUF file (llama architecture, f32/f16) for llama.cpp",
)
