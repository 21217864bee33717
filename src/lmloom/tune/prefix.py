"""Prefix tuning (Li & Liang 2021) on our frozen `Decoder`, saved in PEFT's PREFIX_TUNING adapter format.

Each layer gets P learned key and value vectors per kv-head that every real position attends to, as if P
virtual tokens came first. Nothing in the decoder changes: `PrefixTuned` writes the prefixes into the
first P positions of a `KVCache` and runs the input at `start_pos=P`; the attention of a chunk after a
prefix then sees the whole prefix and is causal within itself. Gradients reach the prefix parameters
through the cache's in-place writes (autograd's CopySlices); the base model is frozen.

Positions: the input's RoPE positions start at P, not 0 (the prefix keys are used as they are, never
rotated again), exactly what Hugging Face does with `past_key_values` of length P and so what PEFT's
prefix tuning computes on an HF Llama. A prefix-tuned model therefore fits P fewer real tokens in its
`seq_len`, and `PrefixTuned.config.seq_len` says so.

Parameters: either the prefixes themselves ([n_layers, 2, kv_heads, P, head_dim], our RoPE "pairs"
layout for keys, i.e. exactly what goes into our cache), or with `projection_hidden` the paper's
reparameterisation, prefix = MLP(E) with E [P, d_model] and a tanh MLP (as PEFT's `prefix_projection`),
which trains more stably; only the MLP's output matters after training.

Init: "random" draws N(0, s^2) with s = init_std * sqrt(d_model), the scale of a key or value that a
fresh projection gives a unit-RMS input; "from_vocab" (the paper's "activations of real words") runs the
frozen model on P vocabulary tokens (`init_token_ids`, or drawn with `seed`) and starts from their
keys and values at positions 0..P-1. With the MLP, "from_vocab" starts E at those tokens' embeddings.

PEFT format: `prompt_embeddings` [P, n_layers * 2 * kv_heads * head_dim], the row of virtual token p
viewed as [n_layers, 2 (key, value), kv_heads, head_dim] (PEFT's `get_prompt`: view then permute to
[n_layers*2, batch, heads, P, head_dim] and split in (key, value) pairs); keys are permuted from pairs to
HF's halves layout within each head (values are not rotated and keep their order). The computed prefixes
are saved, so the file says `prefix_projection: false` whatever trained them: PEFT then loads them
directly, for inference or to train on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import nn

from lmloom.config import StrictConfig
from lmloom.models.decoder import Decoder, DecoderConfig, KVCache
from lmloom.tune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _jsonable, write_adapter_files


class PrefixSettings(StrictConfig):
    """Learned per-layer key/value prefixes of length n_prefix; the base model is frozen."""

    n_prefix: int = Field(10, ge=1, description="P, the number of virtual tokens (prefix length)")
    init: Literal["random", "from_vocab"] = Field(
        "from_vocab", description="random normal, or the keys/values of real vocabulary tokens (the paper's)"
    )
    init_token_ids: list[int] | None = Field(
        None, description="the n_prefix tokens for init='from_vocab'; None = drawn with seed"
    )
    projection_hidden: int | None = Field(
        None, ge=1, description="hidden width of the reparameterisation MLP (paper: 512-800); None = no MLP"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check_tokens(self) -> PrefixSettings:
        if self.init_token_ids is not None:
            if self.init != "from_vocab":
                raise ValueError("init_token_ids is only used with init='from_vocab'")
            if len(self.init_token_ids) != self.n_prefix:
                raise ValueError(
                    f"init_token_ids has {len(self.init_token_ids)} tokens, n_prefix is {self.n_prefix}"
                )
        return self


def pairs_to_halves_last(x: torch.Tensor) -> torch.Tensor:
    """Reorder the last dim (head_dim) from RoPE pairs (2i, 2i+1) to HF's halves (i, i + D/2)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def halves_to_pairs_last(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `pairs_to_halves_last`."""
    return x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


class PrefixTuned(nn.Module):
    """A frozen decoder behind learned key/value prefixes. `forward(idx, targets=None)` is the decoder's;
    `new_kv_cache` + `forward(..., kv_cache=, start_pos=)` make it usable by `serve.generate`, with
    positions counted from the first real token (the prefix is invisible to the caller)."""

    def __init__(self, model: Decoder, settings: PrefixSettings):
        super().__init__()
        self.model = model
        self.settings = settings
        for param in model.parameters():
            param.requires_grad_(False)
        cfg = model.config
        P = settings.n_prefix
        if P >= cfg.seq_len:
            raise ValueError(f"n_prefix ({P}) leaves no room in the model's seq_len ({cfg.seq_len})")
        self.kv_shape = (cfg.n_layers, 2, cfg.kv_heads, P, cfg.head_dim)
        weight = model.tok_emb.weight
        generator = torch.Generator().manual_seed(settings.seed)
        token_ids = None
        if settings.init == "from_vocab":
            ids = settings.init_token_ids
            if ids is None:
                ids = torch.randint(0, cfg.vocab_size, (P,), generator=generator).tolist()
            if any(not 0 <= t < cfg.vocab_size for t in ids):
                raise ValueError(f"init_token_ids must lie in [0, {cfg.vocab_size})")
            token_ids = torch.tensor([ids], device=weight.device)
        if settings.projection_hidden is None:
            self.prefix_embedding, self.prefix_mlp = None, None
            if token_ids is None:
                std = cfg.init_std * cfg.d_model**0.5
                init = torch.randn(self.kv_shape, generator=generator) * std
            else:
                init = self._vocab_keys_values(token_ids)
            self.prefix = nn.Parameter(init.float().to(weight.device))
        else:
            self.prefix = None
            hidden, out = settings.projection_hidden, cfg.n_layers * 2 * cfg.kv_heads * cfg.head_dim
            if token_ids is None:
                emb = torch.randn(P, cfg.d_model, generator=generator)
            else:
                emb = model.tok_emb.weight.detach()[token_ids[0]].float().cpu()
            self.prefix_embedding = nn.Parameter(emb.to(weight.device))
            self.prefix_mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.Tanh(), nn.Linear(hidden, out))
            with (
                torch.no_grad()
            ):  # nn.Linear's own init, drawn from the seeded generator (not the global one)
                for linear in (self.prefix_mlp[0], self.prefix_mlp[2]):
                    bound = linear.in_features**-0.5
                    nn.init.uniform_(linear.weight, -bound, bound, generator=generator)
                    nn.init.uniform_(linear.bias, -bound, bound, generator=generator)
            self.prefix_mlp.to(weight.device)

    @torch.no_grad()
    def _vocab_keys_values(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The frozen model's keys and values of `token_ids` [1, P] at positions 0..P-1, [L, 2, Hkv, P, D]."""
        P = token_ids.shape[1]
        cache = self.model.new_kv_cache(1, P)
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(token_ids, kv_cache=cache, start_pos=0)
        finally:
            self.model.train(was_training)
        return torch.stack(
            [torch.stack((k[0, :, :P], v[0, :, :P])) for k, v in zip(cache.keys, cache.values, strict=True)]
        )

    @property
    def n_prefix(self) -> int:
        return self.settings.n_prefix

    @property
    def config(self) -> DecoderConfig:
        """The decoder's config with seq_len reduced by the prefix: what a caller may feed."""
        cfg = self.model.config
        return cfg.model_copy(update={"seq_len": cfg.seq_len - self.n_prefix})

    def prefix_kv(self) -> torch.Tensor:
        """The prefix keys and values, [n_layers, 2, kv_heads, P, head_dim] (keys in our pairs layout)."""
        if self.prefix is not None:
            return self.prefix
        L, two, Hkv, P, D = self.kv_shape
        flat = self.prefix_mlp(self.prefix_embedding)  # [P, L * 2 * Hkv * D], PEFT's layout
        return flat.view(P, L, two, Hkv, D).permute(1, 2, 3, 0, 4)

    def _fill_prefix(self, cache: KVCache) -> None:
        kv = self.prefix_kv().to(cache.keys[0].dtype)
        P = self.n_prefix
        for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
            keys[:, :, :P] = kv[layer, 0]  # broadcast over the batch; in place, so autograd's CopySlices
            values[:, :, :P] = kv[layer, 1]
        cache.n_prefix = P  # marks a cache this wrapper filled

    def new_kv_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A KV cache for `max_len` real positions whose first P slots hold the prefix (detached: for
        generation). Pass it to `forward` with start_pos counted from the first real token."""
        max_len = self.config.seq_len if max_len is None else max_len
        if self.n_prefix + max_len > self.model.config.seq_len:
            raise ValueError(
                f"{max_len} positions after a prefix of {self.n_prefix} exceed seq_len {self.model.config.seq_len}"
            )
        cache = self.model.new_kv_cache(batch_size, self.n_prefix + max_len, dtype=dtype)
        with torch.no_grad():
            self._fill_prefix(cache)
        return cache

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, V] for idx [B, T] after the prefix, or the mean loss with targets (as `Decoder`).

        Without kv_cache a fresh cache holds the prefix (differentiable: training); with one, it must come
        from `self.new_kv_cache` and start_pos counts real tokens (0 = the first after the prefix).
        """
        B, T = idx.shape
        P = self.n_prefix
        if kv_cache is None:
            if start_pos:
                raise ValueError("start_pos needs the kv_cache that holds the earlier positions")
            if P + T > self.model.config.seq_len:
                raise ValueError(
                    f"{T} tokens after a prefix of {P} exceed the model's seq_len {self.model.config.seq_len}"
                )
            kv_cache = self.model.new_kv_cache(B, P + T)
            self._fill_prefix(kv_cache)
        elif getattr(kv_cache, "n_prefix", None) != P:
            raise ValueError("kv_cache was not made by this PrefixTuned.new_kv_cache (its prefix is missing)")
        return self.model(idx, targets, kv_cache=kv_cache, start_pos=P + start_pos)

    def prefix_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (for the optimiser); the base model's are frozen."""
        return [p for name, p in self.named_parameters() if not name.startswith("model.")]

    def prefix_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors only (the base model's are not included)."""
        return {name: p.detach() for name, p in self.named_parameters() if not name.startswith("model.")}

    @torch.no_grad()
    def peft_prompt_embeddings(self) -> torch.Tensor:
        """The prefixes as PEFT's `prompt_embeddings` [P, n_layers * 2 * kv_heads * head_dim] for HF Llama."""
        return to_peft_layout(self.prefix_kv().detach().float().cpu())


def to_peft_layout(kv: torch.Tensor) -> torch.Tensor:
    """Our [n_layers, 2, kv_heads, P, head_dim] (keys in pairs layout) -> PEFT's [P, n_layers*2*kv_heads*head_dim]
    for an HF Llama: keys permuted pairs -> halves, as hf_llama permutes k_proj's rows (values unchanged)."""
    kv = kv.clone()
    kv[:, 0] = pairs_to_halves_last(kv[:, 0])
    L, two, Hkv, P, D = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(P, L * two * Hkv * D).contiguous()


def from_peft_layout(emb: torch.Tensor, n_layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `to_peft_layout`."""
    P = emb.shape[0]
    kv = emb.view(P, n_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).clone()
    kv[:, 0] = halves_to_pairs_last(kv[:, 0])
    return kv


def _peft_prefix_config(cfg: DecoderConfig, n_prefix: int, base_model_name_or_path: str | None) -> dict:
    import peft

    token_dim = cfg.kv_heads * cfg.head_dim  # what PEFT derives for a Llama (GQA: kv heads x head_dim)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=n_prefix,
        num_layers=cfg.n_layers,
        token_dim=token_dim,
        num_attention_heads=cfg.kv_heads,
        num_transformer_submodules=1,
        encoder_hidden_size=token_dim,
        prefix_projection=False,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    return _jsonable(config.to_dict())


def save_peft_prefix(
    tuned: PrefixTuned, directory: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write a PEFT PREFIX_TUNING adapter that `PeftModel.from_pretrained` loads on the HF Llama export."""
    directory = Path(directory)
    config = _peft_prefix_config(tuned.model.config, tuned.n_prefix, base_model_name_or_path)
    write_adapter_files(directory, config, {"prompt_embeddings": tuned.peft_prompt_embeddings()})
    return directory


def load_peft_prefix(model: Decoder, directory: str | Path) -> PrefixTuned:
    """A `PrefixTuned` around `model` with the prefixes of a PEFT PREFIX_TUNING adapter for its HF export."""
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    cfg = model.config
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{directory}: peft_type={config.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (only adapter_model.safetensors is read, never pickle)")
    tensors = load_file(weights)
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"{weights}: expected one tensor 'prompt_embeddings', found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    P = int(config["num_virtual_tokens"])
    L, Hkv, D = cfg.n_layers, cfg.kv_heads, cfg.head_dim
    if tuple(emb.shape) != (P, L * 2 * Hkv * D):
        raise ValueError(
            f"{weights}: prompt_embeddings has shape {tuple(emb.shape)}, this model needs "
            f"({P}, {L * 2 * Hkv * D}) = (num_virtual_tokens, n_layers * 2 * kv_heads * head_dim)"
        )
    kv = from_peft_layout(emb.float(), L, Hkv, D)
    tuned = PrefixTuned(model, PrefixSettings(n_prefix=P, init="random"))
    with torch.no_grad():
        tuned.prefix.copy_(kv)
    return tuned
